"""`python -m dalle_lightning.benchmark`: one JSON object with the documented keys."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from dalle_lightning import benchmark
from dalle_lightning.benchmark import main
from dalle_lightning.models.dalle import DALLE
from dalle_lightning.sampling.static_decoder import StaticDecoder
from tests.conftest import ROOT

TINY = [
    "--dim",
    "16",
    "--depth",
    "1",
    "--heads",
    "2",
    "--text-seq-len",
    "4",
    "--image-size",
    "16",
    "--grid",
    "4",
    "--batch",
    "2",
    "--warmup",
    "0",
    "--repeats",
    "1",
    "--threads",
    "1",
]


def test_prints_one_json_object_with_the_documented_keys(capsys):
    main(TINY)
    result = json.loads(capsys.readouterr().out)
    parts = {"prior_train", "generate", "dvae_train", "dvae_encode", "caption_encode"}
    assert set(result) == parts | {"config"}
    assert set(result["prior_train"]) == {"seconds_per_step", "tokens_per_s"}
    assert set(result["generate"]) == {"seconds_per_batch", "images_per_s", "codes_per_forward"}
    assert result["generate"]["codes_per_forward"] == 1.0  # one code per forward by default
    assert set(result["dvae_train"]) == {"seconds_per_step", "images_per_s"}
    # throughput counts what a user gets: batch x (text + image tokens) per second
    prior = result["prior_train"]
    assert prior["tokens_per_s"] == pytest.approx(2 * (4 + 16) / prior["seconds_per_step"])
    gen = result["generate"]
    assert gen["images_per_s"] == pytest.approx(2 / gen["seconds_per_batch"])
    assert result["config"]["grid"] == 4 and result["config"]["batch"] == 2
    text = result["caption_encode"]
    share = text["seconds_per_batch_seeded_dropout"] / prior["seconds_per_step"]
    assert text["seeded_share_of_prior_step"] == pytest.approx(share)
    assert set(text) == {
        "seconds_per_batch_no_dropout",
        "seconds_per_batch_seeded_dropout",
        "seconds_per_batch_hf_dropout",
        "seeded_share_of_prior_step",
    }


def test_only_runs_a_subset(capsys):
    main([*TINY, "--only", "generate,prior_train"])
    assert set(json.loads(capsys.readouterr().out)) == {"prior_train", "generate", "config"}
    with pytest.raises(SystemExit):
        main([*TINY, "--only", "generation"])
    assert "unknown part(s) generation" in capsys.readouterr().err


def test_generate_with_jacobi_windows_reports_codes_per_forward(capsys):
    """Random weights give near-uniform code distributions: most guesses are kept, so a
    window of 4 settles more than one code per forward (at most 4)."""
    main([*TINY, "--only", "generate", "--jacobi-window", "4", "--batch", "1"])
    generate = json.loads(capsys.readouterr().out)["generate"]
    assert 1.0 < generate["codes_per_forward"] <= 4.0


def test_generate_samples_a_trained_checkpoint_with_its_own_settings(capsys):
    """--ckpt: the file's prior, dVAE and sampling (a stage-2 checkpoint of an older main)."""
    legacy = ROOT / "tests" / "fixtures" / "legacy" / "dalle_main_d5d9626.ckpt"
    main([*TINY, "--only", "generate", "--ckpt", str(legacy), "--jacobi-window", "2"])
    out = json.loads(capsys.readouterr().out)
    generate, model = out["generate"], DALLE.from_checkpoint(legacy, "cpu")
    assert generate["images_per_s"] > 0 and 1.0 <= generate["codes_per_forward"] <= 2.0
    # reported as the file's, not the random models' that `config` describes
    parameters = sum(p.numel() for p in model.prior.parameters())
    assert generate["ckpt_prior_parameters"] == parameters != out["config"]["prior_parameters"]
    assert generate["ckpt_sampling"] == {**asdict(model.sampling), "jacobi_window": 2}


def test_generate_with_the_static_decoder_and_its_errors(capsys, monkeypatch):
    """--decoder static: the static-shape step decodes every code after the prompt (built for
    guidance's doubled rows when the checkpoint's sampling is guided); Jacobi windows need the
    KV decoder."""
    steps, codes_per_image = [], []

    class CountingStaticDecoder(StaticDecoder):
        def step(self, code, slot):
            steps.append(code.shape[0])
            codes_per_image.append(self.prior.config.image_seq_len)  # the checkpoint's grid
            return super().step(code, slot)

    monkeypatch.setattr(benchmark, "StaticDecoder", CountingStaticDecoder)
    legacy = ROOT / "tests" / "fixtures" / "legacy" / "dalle_main_d5d9626.ckpt"
    main([*TINY, "--only", "generate", "--ckpt", str(legacy), "--decoder", "static"])
    result = json.loads(capsys.readouterr().out)
    assert steps and set(steps) == {2 * 2}  # batch 2, doubled by the checkpoint's guidance
    assert len(steps) == codes_per_image[0] - 1  # one batch (TINY: no warm-up, 1 repeat)
    assert result["generate"]["codes_per_forward"] == 1.0
    assert result["config"]["decoder"] == "static"
    with pytest.raises(SystemExit):
        main([*TINY, "--only", "generate", "--decoder", "static", "--jacobi-window", "4"])
    assert "--jacobi-window needs --decoder kv" in capsys.readouterr().err
