"""Token cache: the frozen dVAE's codes of every image of a split, computed once (paper sec. 2.2).

Stage 2 reads these codes instead of pixels, so its training step never runs the dVAE encoder.
A cache file is keyed by the sha256 of the dVAE checkpoint file and by the dataset's identity
(everything that decides its images and captions) and the split, so every run and sweep job
with the same dVAE and data reuses it, and a different dVAE never reads stale codes. Files are
written to a temporary name and renamed, so a killed run leaves no half-written cache; and
built under a file lock (`filelock`, <file>.lock), so runs started together (a parallel sweep,
two users on one machine) build each file once: one builds, the others wait and load it.
Each file's sha256 is written beside it (<file>.sha256) and checked when it is loaded: a file
whose bytes changed (a bad disk) or that does not load is reported, removed and rebuilt.

What it trades away: each image is encoded once, at its evaluation transform (fixed crop), so
stage 2 sees no random crops or other augmentation of the images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from filelock import FileLock
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dalle_lightning.checkpoints import file_sha256
from dalle_lightning.data.datamodule import collate_image_text
from dalle_lightning.models.image_tokenizer import ImageTokenizer
from dalle_lightning.runs import write_text_atomic
from dalle_lightning.text.tokenizer import BPETokenizer

log = logging.getLogger(__name__)
T = TypeVar("T")


def cache_file(cache_dir: str | Path, name: str, key: dict) -> Path:
    """<cache_dir>/<name>-<hash of key>.pt"""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"{name}-{digest}.pt"


@torch.inference_mode()
def encode_batches(
    dvae: ImageTokenizer, dataset: Dataset, batch_size: int = 16
) -> Iterator[tuple[Tensor, list[str], list[list[str]] | None]]:
    """(codes (b, h, w) int16 argmax codes, first captions, every caption of each image or
    None) per batch of `dataset`, in order: what the token cache and token shards hold.

    channels_last and small batches: several times the images per second of contiguous
    batches of 128 on CPU (docs/speed.md). The dVAE is switched to channels_last in place."""
    dvae.eval()
    dvae.to(memory_format=torch.channels_last)
    device = next(dvae.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_image_text)
    for batch in loader:
        images = batch["image"].to(device).contiguous(memory_format=torch.channels_last)
        codes = dvae.encode(images).to(torch.int16).cpu()
        yield codes, batch["caption"], batch.get("captions")


def encode_dataset(dvae: ImageTokenizer, dataset: Dataset, batch_size: int = 16) -> dict:
    """{"codes": (n, h, w) int16 argmax codes, "captions": list[str]} in dataset order, plus
    "all_captions" (list of lists) when the items carry several captions per image."""
    codes: list[Tensor] = []
    captions: list[str] = []
    all_captions: list[list[str]] = []
    for batch_codes, firsts, every in encode_batches(dvae, dataset, batch_size):
        codes.append(batch_codes)
        captions.extend(firsts)
        all_captions.extend(every or [])
    tokens = {"codes": torch.cat(codes), "captions": captions}
    if all_captions:
        tokens["all_captions"] = all_captions
    return tokens


def load_or_encode(
    dvae: ImageTokenizer,
    dvae_sha256: str,
    identity: dict,
    dataset: Dataset,
    split: str,
    cache_dir,
) -> dict:
    """The cached codes and captions of `split`, encoding and saving them on first use."""
    path = cache_file(cache_dir, split, {"dvae": dvae_sha256, "data": identity, "split": split})
    with _building(path):
        tokens = _load_checked(path, lambda f: torch.load(f, weights_only=True))
        if tokens is not None:
            log.info("token cache: %s (%s)", path, split)
            return tokens
        size = len(dataset) if hasattr(dataset, "__len__") else "all"  # a stream has no length
        log.info("token cache: encoding %s %s images with the dVAE -> %s", size, split, path)
        tokens = encode_dataset(dvae, dataset)
        _write_checked(path, lambda f: torch.save(tokens, f))
        return tokens


def _checksum_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_checked(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through a temporary name, then its sha256 beside it."""
    partial = path.with_suffix(f".tmp{os.getpid()}")
    try:  # a full disk leaves no partial file behind
        write(partial)
        digest = file_sha256(partial)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    write_text_atomic(_checksum_file(path), digest + "\n")


def _load_checked(path: Path, read: Callable[[Path], T]) -> T | None:
    """`read(path)` when the file is whole; None when it is missing, and (with a warning, the
    file removed) when its bytes do not match the sha256 written with it or do not load: a
    killed writer or a bad disk, never used silently. A file from before checksums were
    written is adopted if it loads."""
    if not path.is_file():
        return None
    sums = _checksum_file(path)
    problem = None
    if sums.is_file() and sums.read_text().strip() != file_sha256(path):
        problem = "its bytes do not match the sha256 written with it"
    else:
        try:
            value = read(path)
        except Exception as err:  # truncated zip, bad JSON, ...
            problem = f"it does not load ({type(err).__name__}: {err})"
    if problem is not None:
        log.warning("cache file %s is corrupt (%s): rebuilding it", path, problem)
        path.unlink()
        sums.unlink(missing_ok=True)
        return None
    if not sums.is_file():
        write_text_atomic(sums, file_sha256(path) + "\n")
    return value


def _building(path: Path) -> FileLock:
    """The lock that one process holds while it checks for and builds `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{path}.lock")


def load_or_train_tokenizer(
    captions: list[str], identity: dict, vocab_size: int, text_seq_len: int, cache_dir
) -> BPETokenizer:
    """The BPE of a dataset's training captions, trained once per (data, vocab_size) and kept
    beside the token cache: BPE training breaks ties arbitrarily, so retraining could renumber
    the ids of a resumed run. The prior and the in-project CLIP of one dataset share it."""
    path = cache_file(cache_dir, "tokenizer", {"data": identity, "vocab_size": vocab_size})
    path = path.with_suffix(".json")
    with _building(path):  # two trainings could break ties differently: one learns the ids
        loaded = _load_checked(path, lambda f: BPETokenizer.load(f, vocab_size, text_seq_len))
        if loaded is not None:
            log.info("BPE tokenizer: %s", path)
            return loaded
        tokenizer = BPETokenizer.train(captions, vocab_size, text_seq_len)
        log.info(
            "BPE tokenizer: %d ids learned (vocab_size %d) from %d training captions -> %s",
            tokenizer.tokenizer.get_vocab_size(),
            vocab_size,
            len(captions),
            path,
        )
        _write_checked(path, tokenizer.save)
        return tokenizer
