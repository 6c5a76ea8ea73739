"""`python evaluate.py task=attributes`: does a stage-2 model draw what the caption says?

For `num_captions` captions of the `test` split (only (colour, shape) pairs seen in training)
and of the `heldout` split (pairs never seen), one image is generated per caption (best-of-1)
and scored by the pixel-level attribute checker (`attribute_checker.py`). Two references are
scored the same way: the real images (the checker's own agreement, 100% on shapes) and the
real images passed through the dVAE (encode, decode): the most a prior can reach with this
dVAE. Writes metrics.json and one grid per split (real / dVAE reconstruction / generated).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.utils import make_grid, save_image

from dalle_lightning.config import require
from dalle_lightning.data.datamodule import ImageTextDataModule
from dalle_lightning.evaluation.attribute_checker import check_attributes
from dalle_lightning.models.dalle import DALLE
from dalle_lightning.sampling.sampler import SamplingConfig

log = logging.getLogger(__name__)

SPLITS = {"seen": "test", "heldout": "heldout"}


def score(images: torch.Tensor, records: list[dict]) -> dict:
    """Share of images matching their record, and pass rates per attribute kind."""
    checked: dict[str, int] = {}
    passed: dict[str, int] = {}
    matches = 0
    for image, record in zip(images, records, strict=True):
        result = check_attributes(image, record)
        matches += result.match
        for kind, n in result.checked.items():
            checked[kind] = checked.get(kind, 0) + n
            passed[kind] = passed.get(kind, 0) + result.passed[kind]
    # "extra" is only recorded when an unmentioned object is found: report its absence rate
    extra_found = checked.pop("extra", 0)
    passed.pop("extra", None)
    rates = {k: passed[k] / checked[k] for k in sorted(checked)}
    rates["no_extra_object"] = 1 - extra_found / len(records)
    return {"accuracy": matches / len(records), "per_attribute": rates}


def generated_matches(
    model: DALLE,
    dataset: Dataset,
    indices: Sequence[int],
    sampling: SamplingConfig,
    seed: int,
    batch_size: int = 64,
) -> int:
    """How many of the best-of-1 images drawn for the captions of items `indices` of a shapes
    split match their records (the prior's side of `attribute_accuracy`, without references)."""
    items = [dataset[i] for i in indices]
    if not items:
        return 0
    captions, records = [it["caption"] for it in items], [it["record"] for it in items]
    generated = model.generate(captions, 1, seed=seed, sampling=sampling, batch_size=batch_size)
    return sum(
        check_attributes(image, r).match for image, r in zip(generated.cpu(), records, strict=True)
    )


def attribute_accuracy(
    model: DALLE,
    datamodule: ImageTextDataModule,
    num_captions: int,
    sampling: SamplingConfig,
    seed: int,
    out_dir: Path,
    batch_size: int = 64,
) -> dict:
    """{"seen": ..., "heldout": ...}: per split the accuracy of the generated images, of the
    dVAE's reconstructions and of the real images; one grid per split in `out_dir`.
    `batch_size`: images sampled together (evaluate.py's sampling.batch_size)."""
    n = num_captions
    require(
        all(split in datamodule.datasets for split in SPLITS.values()),
        "dataset",
        type(datamodule).__name__,
        "the built-in shapes (task=attributes needs its attribute records)",
    )
    device = model.dvae.decoder.blocks.input.weight.device
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for name, split in SPLITS.items():
        dataset = datamodule.datasets[split]
        require(n <= len(dataset), "num_captions", n, f"<= {len(dataset)} (the {split} split)")
        items = [dataset[i] for i in range(n)]
        captions, records = [it["caption"] for it in items], [it["record"] for it in items]
        real = torch.stack([it["image"] for it in items])
        with torch.no_grad():
            codes = model.dvae.encode(real.to(device))
            reconstructed = model.dvae.decode(codes).float().cpu()
        log.info("generating %d images for %s captions", n, name)
        generated = model.generate(
            captions, 1, seed=seed, sampling=sampling, batch_size=batch_size
        ).cpu()
        results[name] = {
            "split": split,
            "num_captions": n,
            "generated": score(generated, records),
            "dvae_reconstruction": score(reconstructed, records),
            "real": score(real, records),
        }
        k = min(n, 16)
        grid = make_grid(torch.cat([real[:k], reconstructed[:k], generated[:k]]), nrow=k)
        save_image(grid, out_dir / f"attributes_{name}.png")
        (out_dir / f"attributes_{name}_captions.txt").write_text("\n".join(captions[:k]) + "\n")
        log.info(
            "%s: generated %.1f%%, dVAE reconstruction %.1f%%, real %.1f%%",
            name,
            100 * results[name]["generated"]["accuracy"],
            100 * results[name]["dvae_reconstruction"]["accuracy"],
            100 * results[name]["real"]["accuracy"],
        )
    return results


def flat_metrics(results: dict) -> dict:
    """metrics.json's flat view: <seen|heldout>/<generated|dvae_reconstruction|real>_accuracy."""
    return {
        f"{name}/{kind}_accuracy": results[name][kind]["accuracy"]
        for name in SPLITS
        for kind in ("generated", "dvae_reconstruction", "real")
    }
