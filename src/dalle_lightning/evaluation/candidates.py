"""The evaluation's captions and its candidate pool (Ramesh et al., 2021, sec. 3.1-3.2).

Captions: `num_captions` distinct captions drawn from a split with a recorded seed (all of
them when `num_captions` is null or larger than the split).

Candidates: N = max(rerank_counts) images per caption, generated once and written as PNGs as
they are made: <pool>/<caption:06d>_<candidate:03d>.png. Captions are generated in fixed
chunks whose random generator is seeded from (seed, split, chunk), so a chunk's images do
not depend on which chunks ran before: a run killed mid-way and started again skips the
finished chunks, regenerates the unfinished one, and ends with exactly the same pool. Each
chunk is made under a file lock (`filelock`), so evaluations of one pool started together
(a parallel sweep) split the chunks between them instead of writing the same files at once.

Every finished chunk (and the real images) has a manifest of its PNGs' sha256
(`.chunk<i>.sha256`, `.real.sha256`): a PNG that is missing, cut short or changed on disk
(a bad disk, a killed copy) is reported in one warning and its chunk made again, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import torch
from filelock import FileLock
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from dalle_lightning.checkpoints import file_sha256
from dalle_lightning.evaluation.fidelity import save_images
from dalle_lightning.models.dalle import DALLE
from dalle_lightning.runs import write_text_atomic
from dalle_lightning.sampling.sampler import SamplingConfig

log = logging.getLogger(__name__)


def sample_captions(dataset: Dataset, num: int | None, seed: int) -> list[tuple[int, str]]:
    """(image index, caption) pairs: `num` distinct captions of `dataset` drawn with `seed`
    (in drawing order), or every distinct caption in dataset order."""
    seen: set[str] = set()
    pairs = []
    for index in range(len(dataset)):
        for caption in dataset.captions_of(index):
            if caption not in seen:
                seen.add(caption)
                pairs.append((index, caption))
    if num is None or num >= len(pairs):
        if num is not None and num > len(pairs):
            log.warning("num_captions=%d: the split has only %d distinct captions", num, len(pairs))
        return pairs
    return [pairs[j] for j in random.Random(seed).sample(range(len(pairs)), num)]


def write_real_images(dataset: Dataset, pairs: list, folder: Path, split: str) -> int:
    """Each real image of the (image, caption) pairs once, as the dataset's eval transform
    gives it, as an 8-bit PNG named by its index (skipped when all are there); their number."""
    unique = list(dict.fromkeys(i for i, _ in pairs))
    paths = [folder / f"{i:06d}.png" for i in unique]
    manifest = folder / ".real.sha256"
    if not intact(paths, manifest, f"{split} real images"):
        log.info("%s: writing %d real images", split, len(unique))
        for start in range(0, len(unique), 64):
            idx = unique[start : start + 64]
            images = torch.stack([dataset[i]["image"] for i in idx])
            save_images(images, folder, names=[f"{i:06d}" for i in idx])
        record(paths, manifest)
    return len(unique)


def record(paths: list[Path], manifest: Path) -> None:
    """Write the sha256 of every file of `paths` to `manifest` (temporary name, rename)."""
    digests = {p.name: file_sha256(p) for p in paths}
    write_text_atomic(manifest, json.dumps(digests, indent=0) + "\n")


def intact(paths: list[Path], manifest: Path, what: str) -> bool:
    """Whether every file of `paths` is on disk as `manifest` recorded it; a file that is
    there but differs is reported (one warning) so that the caller makes it again."""
    if not manifest.is_file() or not all(p.is_file() for p in paths):
        return False
    try:
        digests = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        digests = {}
    for path in paths:
        if digests.get(path.name) != file_sha256(path):
            log.warning("%s: %s is corrupt (its sha256 differs from %s): making it again",
                        what, path, manifest.name)  # fmt: skip
            return False
    return True


def candidate_name(caption: int, candidate: int) -> str:
    return f"{caption:06d}_{candidate:03d}"


def candidate_paths(folder: Path, num_captions: int, n: int) -> list[list[Path]]:
    return [[folder / f"{candidate_name(i, j)}.png" for j in range(n)] for i in range(num_captions)]


def chunk_seed(seed: int, split: str, chunk: int) -> int:
    digest = hashlib.sha256(f"{seed}/{split}/{chunk}".encode()).hexdigest()
    return int(digest[:15], 16)


def generate_pool(
    model: DALLE,
    captions: list[str],
    n: int,
    folder: Path,
    seed: int,
    split: str,
    sampling: SamplingConfig,
    batch_size: int,
) -> dict:
    """Make every missing candidate of `captions`; {"generated", "reused"} image counts."""
    per_chunk = max(1, batch_size // n)  # captions per chunk: chunk images fill a batch
    paths = candidate_paths(folder, len(captions), n)
    generated = reused = 0
    chunks = range(0, len(captions), per_chunk)
    bar = tqdm(total=len(captions), desc=f"{split}: captions ({n} candidates each)", unit="cap")
    folder.mkdir(parents=True, exist_ok=True)
    for chunk, start in enumerate(chunks):
        stop = min(start + per_chunk, len(captions))
        # one process makes a chunk; another evaluation of the same pool waits, then reuses it
        chunk_paths = [p for row in paths[start:stop] for p in row]
        manifest = folder / f".chunk{chunk:06d}.sha256"
        with FileLock(folder / f".chunk{chunk:06d}.lock"):
            if intact(chunk_paths, manifest, f"{split} candidate pool"):
                reused += (stop - start) * n
            else:
                images = model.generate(
                    captions[start:stop],
                    n,
                    seed=chunk_seed(seed, split, chunk),
                    sampling=sampling,
                    batch_size=(stop - start) * n,
                )
                names = [candidate_name(i, j) for i in range(start, stop) for j in range(n)]
                save_images(images, folder, names=names)
                record(chunk_paths, manifest)
                generated += len(names)
        bar.update(stop - start)
        bar.set_postfix(images=generated + reused)
    bar.close()
    return {"generated": generated, "reused": reused}
