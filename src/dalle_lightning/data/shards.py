"""Tar shards (webdataset format) of a dataset, and of its dVAE codes: data at scale.

    python -m dalle_lightning.data.shards write OUT [--maxcount N] [dataset=coco dataset.root=...]
    python -m dalle_lightning.data.shards encode OUT --dvae CKPT [dataset=webdataset ...]

`write` turns any configured dataset (the Hydra `dataset=` group and its keys) into
`OUT/<split>-000000.tar, ...` plus a manifest `OUT/<split>.json`. A sample is one image with
all its captions: `<key>.<jpg|png|...>` (the original file's bytes, or a PNG of a rendered
shapes image) and `<key>.json` = {"captions": [...]}. Images that cannot be read were already
skipped and counted by the dataset's audit (the manifest keeps that report).

`encode` pre-encodes a dataset (typically `dataset=webdataset`, the shards `write` made) with
a trained dVAE into token shards: `<key>.codes.npy` (the (h, w) int16 argmax codes, the
eval transform's crop) and `<key>.json`, with a manifest naming the dVAE's sha256. The prior
reads them instead of encoding (`dataset.token_shards=OUT`): the token cache at scale.

Manifest: {"kind": "images" | "tokens", "split", "count", "shards": [file names],
"data": the source dataset's identity, "report": its bad-data counts, "dvae_sha256"}.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import to_pil_image

from dalle_lightning.data.datamodule import ImageTextDataModule
from dalle_lightning.data.token_cache import encode_batches
from dalle_lightning.data.workers import worker_options

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


def manifest_path(root: str | Path, split: str) -> Path:
    return Path(root) / f"{split}.json"


def _save_manifest(out: Path, split: str, manifest: dict) -> None:
    manifest_path(out, split).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(root: str | Path, split: str, kind: str) -> dict:
    path = manifest_path(root, split)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"{path}: no shard manifest ({err}); write shards with "
            f"`python -m dalle_lightning.data.shards {'write' if kind == 'images' else 'encode'}`"
        ) from None
    if manifest.get("kind") != kind:
        raise ValueError(f"{path} describes {manifest.get('kind')} shards, not {kind}")
    return manifest


class _RawSamples(Dataset):
    """(key, extension, bytes, captions) of every image of a split, in order."""

    def __init__(self, datamodule: ImageTextDataModule, split: str):
        self.split = split
        items = getattr(datamodule, "items", None)  # images on disk: keep the original bytes
        self.files = items(split) if items else None
        self.rendered = None if self.files else datamodule.cache_dataset(split)

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else len(self.rendered)

    def __getitem__(self, index: int) -> dict:
        if self.files is not None:
            item = self.files[index]
            extension = item.path.suffix.lower().lstrip(".") or "jpg"
            return {
                "__key__": f"{index:09d}",
                extension: item.path.read_bytes(),
                "json": {"captions": list(item.captions)},
            }
        sample = self.rendered[index]
        buffer = io.BytesIO()
        to_pil_image(sample["image"]).save(buffer, format="PNG")
        captions = sample.get("captions") or [sample["caption"]]
        return {"__key__": f"{index:09d}", "png": buffer.getvalue(), "json": {"captions": captions}}


def _write(samples, out: Path, split: str, maxcount: int, manifest: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    count, written = 0, []  # the manifest lists this run's shards, never stale ones
    pattern = str(out / f"{split}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0, post=written.append) as sink:
        for sample in samples:
            sink.write(sample)
            count += 1
    shards = [Path(name).name for name in written]
    manifest = {**manifest, "split": split, "count": count, "shards": shards}
    _save_manifest(out, split, manifest)
    log.info("%s: %d samples in %d shards -> %s", split, count, len(shards), out)
    return manifest


def _per_source(datamodule: ImageTextDataModule, splits, out: Path, write) -> dict[str, dict]:
    """`write(split, source)` once per source; a split over the same images as an earlier
    one (COCO's val serves val and test) gets a manifest naming that split's shards."""
    manifests, by_source = {}, {}
    for split in splits:
        source = datamodule.source(split)
        if source in by_source:
            manifests[split] = {**by_source[source], "split": split}
            _save_manifest(out, split, manifests[split])
            log.info("%s: the shards of %s (the same images)", split, by_source[source]["split"])
        else:
            manifests[split] = by_source[source] = write(split, source)
    return manifests


def write_shards(
    datamodule: ImageTextDataModule,
    out: str | Path,
    splits=SPLITS,
    maxcount: int = 1000,
    num_workers: int = 0,
) -> dict[str, dict]:
    """Every split of `datamodule` as image shards under `out`; returns the manifests."""
    datamodule.setup()

    def write(split: str, source: str) -> dict:
        raw = _RawSamples(datamodule, split)
        loader = DataLoader(raw, batch_size=None, **worker_options(num_workers, persistent=False))
        report = datamodule.data_report().get(source)
        info = {"kind": "images", "data": datamodule.identity(), "report": report}
        return _write(loader, Path(out), split, maxcount, info)

    return _per_source(datamodule, splits, Path(out), write)


def encode_shards(
    datamodule: ImageTextDataModule,
    dvae,
    dvae_sha256: str,
    out: str | Path,
    splits=SPLITS,
    maxcount: int = 10000,
    batch_size: int = 32,
) -> dict[str, dict]:
    """The dVAE codes of every split of `datamodule` as token shards under `out`."""

    def samples(split: str):
        index = 0
        batches = encode_batches(dvae, datamodule.cache_dataset(split), batch_size)
        for codes, firsts, every in batches:
            for grid, captions in zip(codes.numpy(), every or [[c] for c in firsts], strict=True):
                buffer = io.BytesIO()
                np.save(buffer, grid)
                yield {
                    "__key__": f"{index:09d}",
                    "codes.npy": buffer.getvalue(),
                    "json": {"captions": list(captions)},
                }
                index += 1

    def write(split: str, source: str) -> dict:
        info = {"kind": "tokens", "data": datamodule.identity(), "dvae_sha256": dvae_sha256}
        return _write(samples(split), Path(out), split, maxcount, info)

    return _per_source(datamodule, splits, Path(out), write)


def read_token_shards(urls: list[str]) -> dict:
    """Token shards -> {"codes": (n, h, w) int16, "captions": first of each, "all_captions"},
    the token cache's format."""
    codes, all_captions = [], []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        codes.append(torch.from_numpy(np.load(io.BytesIO(sample["codes.npy"]))))
        all_captions.append(json.loads(sample["json"])["captions"])
    if not codes:
        raise ValueError(f"no samples in the token shards {urls[:3]}...")
    return {
        "codes": torch.stack(codes),
        "captions": [c[0] for c in all_captions],
        "all_captions": all_captions,
    }


def _compose(overrides: list[str]):
    """The training config's dataset (and paths) for command-line Hydra overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from dalle_lightning.runs import register_resolvers

    register_resolvers()
    conf = Path(__file__).resolve().parents[3] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3", job_name="shards"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    from dalle_lightning.checkpoints import file_sha256
    from dalle_lightning.cli import exit_on_user_error
    from dalle_lightning.instantiate import build
    from dalle_lightning.models.dvae import DVAE

    parser = argparse.ArgumentParser(
        prog="python -m dalle_lightning.data.shards", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("command", choices=("write", "encode"))
    parser.add_argument("out", help="the folder the shards and their manifests go to")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: dataset=coco ...")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--maxcount", type=int, default=None, help="samples per shard")
    parser.add_argument("--num-workers", type=int, default=0, help="readers (write)")
    parser.add_argument("--dvae", help="encode: the dVAE checkpoint")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "encode" and not args.dvae:
        parser.error("encode needs --dvae CKPT (a trained dVAE: logs/train_dvae/.../best-*.ckpt)")
    if args.maxcount is not None and args.maxcount < 1:
        parser.error(f"--maxcount={args.maxcount}: at least 1 sample per shard")
    with exit_on_user_error():
        cfg = _compose(args.overrides)
        datamodule = build(cfg.dataset, "dataset")
        if args.command == "write":
            write_shards(datamodule, args.out, args.splits, args.maxcount or 1000, args.num_workers)
        else:
            dvae = DVAE.from_checkpoint(args.dvae, field="--dvae")
            sha = file_sha256(args.dvae)
            encode_shards(datamodule, dvae, sha, args.out, args.splits, args.maxcount or 10000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
