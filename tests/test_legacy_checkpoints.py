"""Checkpoints written before a change still load and compute what they computed then.

tests/fixtures/legacy/ holds a dVAE and a prior checkpoint that `main` wrote at commit
d5d9626 (before the redesign of issue 19), and the numbers that commit's code computed from
them (`expected.json`); see the README there.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from dalle_lightning.evaluate import evaluate
from dalle_lightning.models.dalle import DALLE
from dalle_lightning.models.dvae import DVAE
from dalle_lightning.sampling.sampler import sample_codes

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
EXPECTED = json.loads((LEGACY / "expected.json").read_text())
CAPTIONS = ["a red circle on the left", "a blue square"]


def test_a_dvae_checkpoint_of_main_d5d9626_encodes_as_it_did():
    dvae = DVAE.from_checkpoint(LEGACY / "dvae_main_d5d9626.ckpt")
    images = torch.linspace(0, 1, 2 * 3 * 32 * 32).view(2, 3, 32, 32)
    assert dvae.encode(images).tolist() == EXPECTED["dvae_codes"]


def test_a_prior_checkpoint_of_main_d5d9626_samples_as_it_did():
    model = DALLE.from_checkpoint(LEGACY / "dalle_main_d5d9626.ckpt")
    # settings added since take their defaults (jacobi_window 0: one code per forward)
    assert asdict(model.sampling) == {**EXPECTED["sampling"], "jacobi_window": 0}
    assert model.caption_dropout == EXPECTED["caption_dropout"]
    text = model.tokenizer.encode(CAPTIONS)
    assert text.tolist() == EXPECTED["text_ids"]
    generator = torch.Generator().manual_seed(0)
    samples = sample_codes(model.prior, text, model.sampling, generator)
    assert samples.codes.tolist() == EXPECTED["sampled_codes"]
    images = model.generate(CAPTIONS[:1], 2, seed=0)
    assert abs(float(images.double().sum()) - EXPECTED["image_sum"]) < 1e-6 * EXPECTED["image_sum"]


def test_a_legacy_dvae_checkpoint_evaluates_with_its_own_settings(make_cfg, tmp_path):
    """task=reconstruction rebuilds the dVAE module from the old file's hyper_parameters
    (the same layout as conf/model/dvae.yaml) and tests it on a split."""
    cfg = make_cfg(
        [
            "task=reconstruction",
            f"ckpt_path={LEGACY / 'dvae_main_d5d9626.ckpt'}",
            "dataset.image_size=32",
            "dataset.num_test=8",
            "trainer.accelerator=cpu",
        ],
        config_name="evaluate",
    )
    summary = evaluate(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert metrics["test/psnr"] == summary["metrics"]["test/psnr"] > 0
    assert 0 < metrics["test/codebook_used"] <= 1
