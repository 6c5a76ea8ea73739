"""`python -m dalle_lightning.benchmark`: one JSON object with the documented keys."""

from __future__ import annotations

import json

import pytest

from dalle_lightning.benchmark import main

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
    assert set(result["generate"]) == {"seconds_per_batch", "images_per_s"}
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
