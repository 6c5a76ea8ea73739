"""Token cache: the frozen dVAE's codes of every image of a split, computed once (paper sec. 2.2).

Stage 2 reads these codes instead of pixels, so its training step never runs the dVAE encoder.
A cache file is keyed by the sha256 of the dVAE checkpoint file and by the dataset's identity
(everything that decides its images and captions) and the split, so every run and sweep job
with the same dVAE and data reuses it, and a different dVAE never reads stale codes. Files are
written to a temporary name and renamed, so a killed run leaves no half-written cache; and
built under a file lock (`filelock`, <file>.lock), so runs started together (a parallel sweep,
two users on one machine) build each file once: one builds, the others wait and load it.

What it trades away: each image is encoded once, at its evaluation transform (fixed crop), so
stage 2 sees no random crops or other augmentation of the images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from filelock import FileLock
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dalle_lightning.data.datamodule import collate_image_text
from dalle_lightning.models.image_tokenizer import ImageTokenizer
from dalle_lightning.text.tokenizer import BPETokenizer

log = logging.getLogger(__name__)


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
        if path.is_file():
            log.info("token cache: %s (%s)", path, split)
            return torch.load(path, weights_only=True)
        size = len(dataset) if hasattr(dataset, "__len__") else "all"  # a stream has no length
        log.info("token cache: encoding %s %s images with the dVAE -> %s", size, split, path)
        tokens = encode_dataset(dvae, dataset)
        partial = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(tokens, partial)
        partial.replace(path)
        return tokens


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
        if path.is_file():
            log.info("BPE tokenizer: %s", path)
            return BPETokenizer.load(path, vocab_size, text_seq_len)
        tokenizer = BPETokenizer.train(captions, vocab_size, text_seq_len)
        log.info(
            "BPE tokenizer: %d ids learned (vocab_size %d) from %d training captions -> %s",
            tokenizer.tokenizer.get_vocab_size(),
            vocab_size,
            len(captions),
            path,
        )
        partial = path.with_suffix(f".tmp{os.getpid()}")
        tokenizer.save(partial)
        partial.replace(path)
        return tokenizer
