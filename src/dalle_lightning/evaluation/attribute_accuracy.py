"""`python evaluate.py task=attributes`: does a stage-2 model draw what the caption says?

For `num_captions` captions of the `test` split (only (colour, shape) pairs seen in training)
and of the `heldout` split (pairs never seen), one image is generated per caption (best-of-1)
and scored by the pixel-level attribute checker (`data/attributes.py`). Two references are
scored the same way: the real images (the checker's own agreement, 100% on shapes) and the
real images passed through the dVAE (encode, decode): the most a prior can reach with this
dVAE. Writes metrics.json and one grid per split (real / dVAE reconstruction / generated).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torchvision.utils import make_grid, save_image

from dalle_lightning.config import require, require_int
from dalle_lightning.data.attributes import check_attributes
from dalle_lightning.instantiate import build
from dalle_lightning.models.dalle import DALLE
from dalle_lightning.run_summary import run_header, write_metrics

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


def attribute_accuracy(cfg: DictConfig, model: DALLE, ckpt_path: str) -> dict:
    started = time.time()
    n = cfg.num_captions
    require_int("num_captions", n, 1)
    datamodule = build(cfg.dataset, "dataset")
    datamodule.setup()
    require(
        all(split in datamodule.datasets for split in SPLITS.values()),
        "dataset",
        cfg.dataset.get("_target_"),
        "the built-in shapes (task=attributes needs its attribute records)",
    )
    require(
        cfg.dataset.image_size == model.dvae.config.image_size,
        "dataset.image_size",
        cfg.dataset.image_size,
        f"the dVAE's image size, {model.dvae.config.image_size}",
    )
    device = model.dvae.decoder.blocks.input.weight.device
    sampling = dict(cfg.sampling)
    out_dir = Path(cfg.paths.output_dir)
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
        generated = model.generate(captions, 1, seed=cfg.seed, **sampling).cpu()
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
    summary = run_header(cfg, time.time() - started)
    summary.update(checkpoints={"evaluated": str(ckpt_path)}, sampling=sampling, attributes=results)
    summary["metrics"] = {
        f"{name}/{kind}_accuracy": results[name][kind]["accuracy"]
        for name in SPLITS
        for kind in ("generated", "dvae_reconstruction", "real")
    }
    write_metrics(out_dir / "metrics.json", summary)
    return summary
