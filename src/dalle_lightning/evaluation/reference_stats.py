"""FID reference statistics that pin the protocol:

    python -m dalle_lightning.evaluation.reference_stats dataset=coco dataset.year=2014 \
        [split=val | splits=[val]] [num_captions=30000] [seed=1234] [dataset.image_size=256] \
        [blur_radii=[0,1,2,4,8]] [inception_weights=PATH]

takes the captions `evaluate.py` would draw (`num_captions` distinct captions of each split
with `seed`), writes their real images as `evaluate.py` does (the dataset's eval transform,
8-bit PNG), blurs them with each radius, and writes for each split and radius
`reference/<split>/blur<r>.npz` (mu, sigma, count of the Inception pool features) and
`reference/<split>/blur<r>.json` (the protocol, below, and the captions) under the run
directory (logs/evaluate_reference_stats/runs/<time>/).

`python evaluate.py fid_reference=<that reference folder>` then compares generated images
with these statistics instead of the real images, so a machine without the dataset's images
can evaluate: the captions come from the reference too. A reference whose protocol differs
from the run's in any field of `PROTOCOL_FIELDS` is refused with one line naming the first
field that differs (docs/evaluation.md says why each is pinned).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch_fidelity

from dalle_lightning.checkpoints import file_sha256
from dalle_lightning.config import ConfigError
from dalle_lightning.data.datamodule import ImageTextDataModule
from dalle_lightning.evaluation.candidates import sample_captions, write_real_images
from dalle_lightning.evaluation.fidelity import (
    EXTRACTOR,
    FID_LAYER,
    blur_folder,
    inception_sha256,
    inception_statistics,
)
from dalle_lightning.runs import write_text_atomic

log = logging.getLogger(__name__)

PROTOCOL_FIELDS = (
    "dataset",  # the dataset's identity without its root folder (name, year, image size...)
    "split",
    "caption_seed",
    "num_captions",
    "image_size",
    "resize",
    "file_format",
    "blur_radius",
    "blur",
    "inception_weights_sha256",
    "feature_extractor",
    "torch_fidelity",
)
RESIZE = "short side to image_size (PIL box when shrinking, bicubic when enlarging), centre crop"
FILE_FORMAT = "PNG, 8-bit RGB, lossless"
BLUR = "PIL ImageFilter.GaussianBlur(radius px) on real and generated images alike"


def protocol(
    identity: dict,
    split: str,
    seed: int,
    num_captions: int | None,
    image_size: int,
    blur_radius: float,
    weights_sha256: str,
) -> dict:
    """The fields a reference and an evaluation must share for their FID to compare."""
    return {
        "dataset": {k: v for k, v in identity.items() if k != "root"},
        "split": split,
        "caption_seed": seed,
        "num_captions": num_captions,
        "image_size": image_size,
        "resize": RESIZE,
        "file_format": FILE_FORMAT,
        "blur_radius": blur_radius,
        "blur": BLUR,
        "inception_weights_sha256": weights_sha256,
        "feature_extractor": f"{EXTRACTOR} layer {FID_LAYER}",
        "torch_fidelity": torch_fidelity.__version__,
    }


def make(
    datamodule: ImageTextDataModule,
    splits: tuple[str, ...],
    num_captions: int | None,
    seed: int,
    blur_radii: tuple[float, ...],
    image_size: int,
    inception_weights: str | None,
    folder: Path,
) -> dict[str, dict]:
    """The reference files of every split and radius in `folder`; {"<split>/blur<r>": {"npz",
    "json", "count"}}. The real PNGs are temporary: only the statistics are kept."""
    sha = inception_sha256(inception_weights)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    written = {}
    for split in splits:
        dataset = datamodule.datasets[split]
        pairs = sample_captions(dataset, num_captions, seed)
        images = folder / split / "real_png"
        real_images = write_real_images(dataset, pairs, images / "blur0", split)
        for radius in blur_radii:
            source = images / "blur0"
            if radius:
                source = blur_folder(source, images / f"blur{radius:g}", radius)
            stats = inception_statistics(source, inception_weights, device)
            record = protocol(
                datamodule.identity(), split, seed, num_captions, image_size, radius, sha
            )
            npz, meta = write(folder, stats, record, pairs, real_images)
            written[f"{split}/blur{radius:g}"] = {
                "npz": str(npz),
                "json": str(meta),
                "count": stats["count"],
            }
            log.info("%s, blur %g: %d images -> %s", split, radius, stats["count"], npz)
        shutil.rmtree(images)
    return written


def paths(folder: str | Path, split: str, radius: float) -> tuple[Path, Path]:
    stem = Path(folder) / split / f"blur{radius:g}"
    return stem.with_suffix(".npz"), stem.with_suffix(".json")


def write(
    folder: str | Path, stats: dict, record: dict, pairs: list[tuple[int, str]], real_images: int
) -> tuple[Path, Path]:
    """`stats` = {mu, sigma, count} and `record` (a `protocol`) with the caption pairs, each
    written to a temporary name and renamed: a killed writer leaves no half file."""
    npz, meta = paths(folder, record["split"], record["blur_radius"])
    npz.parent.mkdir(parents=True, exist_ok=True)
    partial = npz.with_suffix(".partial.npz")
    np.savez(partial, mu=stats["mu"], sigma=stats["sigma"], count=stats["count"])
    partial.replace(npz)
    content = {
        "protocol": record,
        "count": stats["count"],
        "real_images": real_images,
        "statistics_sha256": file_sha256(npz),
        "captions": [[i, c] for i, c in pairs],
    }
    write_text_atomic(meta, json.dumps(content, indent=1) + "\n")
    return npz, meta


def captions(folder: str | Path, split: str, radius: float) -> list[tuple[int, str]]:
    """The (image index, caption) pairs the reference of `split` was made from."""
    return [(int(i), c) for i, c in _meta(folder, split, radius)["captions"]]


def load(folder: str | Path, expected: dict) -> tuple[dict, dict]:
    """({mu, sigma}, {path, sha256, protocol, count}) of the reference file for `expected`'s
    split and blur radius, after checking every protocol field against `expected`."""
    split, radius = expected["split"], expected["blur_radius"]
    npz, meta_path = paths(folder, split, radius)
    meta = _meta(folder, split, radius)
    found = meta["protocol"]
    for field in PROTOCOL_FIELDS:
        if found.get(field) != expected[field]:
            raise ConfigError(
                "fid_reference",
                str(folder),
                f"statistics made with the run's protocol, and {meta_path.name} of {split} has "
                f"{field}={json.dumps(found.get(field))} where this run has "
                f"{json.dumps(expected[field])}: make matching ones with `python -m "
                "dalle_lightning.evaluation.reference_stats` and this run's overrides",
            )
    sha = file_sha256(npz)
    if sha != meta["statistics_sha256"]:
        raise ConfigError(
            "fid_reference", str(npz), "the file its .json names (sha256 differs: remake it)"
        )
    with np.load(npz) as data:
        stats = {"mu": data["mu"], "sigma": data["sigma"]}
    record = {"path": str(npz), "sha256": sha, "count": meta["count"], "protocol": found}
    return stats, record


def _meta(folder: str | Path, split: str, radius: float) -> dict:
    npz, meta = paths(folder, split, radius)
    if not (npz.is_file() and meta.is_file()):
        raise ConfigError(
            "fid_reference",
            str(folder),
            f"a folder written by `python -m dalle_lightning.evaluation.reference_stats` with "
            f"{split}/{npz.name} and {meta.name} (this run's split and blur radius {radius:g})",
        )
    return json.loads(meta.read_text())


def main() -> None:
    """The CLI: evaluate.py's config and run directory with task=reference_stats."""
    root = Path(__file__).resolve().parents[3]
    # `split=val` (one split, as the command is usually written) means `splits=[val]`
    args = [f"splits=[{a[6:].strip('[]')}]" if a.startswith("split=") else a for a in sys.argv[1:]]
    sys.argv = [str(root / "evaluate.py"), "task=reference_stats", *args]
    import runpy  # evaluate.py is the one Hydra entry point for evaluation configs

    runpy.run_path(str(root / "evaluate.py"), run_name="__main__")


if __name__ == "__main__":
    main()
