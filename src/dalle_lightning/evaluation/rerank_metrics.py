"""`python evaluate.py [task=metrics]`: FID and IS over CLIP rerank counts and blur radii
(Ramesh et al., 2021, sec. 3.1-3.2, Fig. 9), the protocol pinned and recorded.

For each evaluation split (`ProtocolConfig.splits`; shapes: seen `test` and held-out
`heldout` pairs):
1. `num_captions` distinct captions drawn with `seed` (`candidates.sample_captions`);
2. the split's real images of those captions, as the dataset's eval transform gives them
   (resize the short side, centre crop to the model's resolution), written as PNGs;
3. N = max(rerank_counts) candidates per caption, generated once into a pool keyed by
   everything that decides them (resumable, `candidates.generate_pool`);
4. every candidate scored by the reranker, read back from its PNG; best-of-k for each k takes
   the best of the first k (`sampling/rerank.best_of_k`): the sweep costs one generation;
5. FID and IS (torch-fidelity) of each best-of-k set against the real images, both blurred
   with each radius of `blur_radii`; on shapes also the attribute-checker accuracy;
6. results.json/csv/md, fid_vs_rerank.png, fid_vs_blur.png, samples_<split>.png.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch_fidelity
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from dalle_lightning.checkpoints import file_sha256
from dalle_lightning.data.datamodule import ImageTextDataModule
from dalle_lightning.evaluation import reference_stats
from dalle_lightning.evaluation.attribute_accuracy import score as attribute_score
from dalle_lightning.evaluation.candidates import (
    candidate_paths,
    generate_pool,
    sample_captions,
    write_real_images,
)
from dalle_lightning.evaluation.fidelity import (
    blur_folder,
    fid_and_is,
    inception_sha256,
    load_images,
    weights_record,
)
from dalle_lightning.evaluation.protocol import ProtocolConfig
from dalle_lightning.evaluation.report import write_report
from dalle_lightning.models.dalle import DALLE
from dalle_lightning.sampling.rerank import Reranker, best_of_k
from dalle_lightning.sampling.sampler import SamplingConfig

log = logging.getLogger(__name__)


class Candidates:
    """Where one split's evaluation keeps its files: the shared pool (candidates, real images,
    Inception features of the real images) and this run's chosen images."""

    def __init__(self, pool: Path, out_dir: Path, split: str):
        self.pool, self.split_dir = pool, out_dir / split
        self.real = pool / "real"

    def chosen(self, k: int) -> Path:
        return self.split_dir / f"best_of_{k}"


def evaluate_split(
    protocol: ProtocolConfig,
    sampling: SamplingConfig,
    batch_size: int,
    seed: int,
    model: DALLE,
    reranker: Reranker,
    datamodule: ImageTextDataModule,
    split: str,
    pool_key: dict,
    log_dir: Path,
    out_dir: Path,
    references: dict | None = None,
) -> dict:
    """{"rows": one per (k, blur radius), "info": what was generated and where} of one split.
    With `references` ({(split, radius): (statistics, record)}) the captions and the real
    side of FID come from reference statistics; the split's images are not read."""
    dataset = datamodule.datasets.get(split)  # None: not set up (a reference replaces it)
    if references is not None:
        pairs = reference_stats.captions(protocol.fid_reference, split, protocol.blur_radii[0])
    else:
        pairs = sample_captions(dataset, protocol.num_captions, seed)
    captions = [c for _, c in pairs]
    n = max(protocol.rerank_counts)
    key = {**pool_key, "split": split, "candidates": n, "captions": _key(pairs)}
    files = Candidates(log_dir / "eval_pools" / _key(key), out_dir, split)
    files.pool.mkdir(parents=True, exist_ok=True)
    (files.pool / "key.json").write_text(json.dumps(key, indent=2, default=str) + "\n")
    (files.pool / "captions.json").write_text(
        json.dumps(pairs, indent=0) + "\n"
    )  # [image, caption]

    if references is None:
        real_images = write_real_images(dataset, pairs, files.real, split)
    else:
        real_images = references[(split, protocol.blur_radii[0])][1]["count"]
    counts = generate_pool(
        model, captions, n, files.pool / "candidates", seed, split, sampling, batch_size
    )
    paths = candidate_paths(files.pool / "candidates", len(captions), n)
    scores = _rerank(reranker, paths, captions, split)
    chosen = best_of_k(scores, list(protocol.rerank_counts))

    records = None
    if dataset is not None and "record" in dataset[pairs[0][0]]:  # shapes: attribute records
        records = [dataset[i]["record"] for i, _ in pairs]
    per_k, sample_rows = {}, []
    for k, index in chosen.items():
        images = load_images(_copy_chosen(paths, index, files.chosen(k)))
        sample_rows.append(images[:8])
        per_k[k] = {
            "clip_score": float(scores.gather(1, index[:, None]).mean()),
            "attribute_accuracy": attribute_score(images, records)["accuracy"] if records else None,
        }
    _save_samples(out_dir, split, sample_rows, list(chosen), captions)

    info = {
        "captions": len(captions),
        "real_images": real_images,
        "candidates_per_caption": n,
        "images_in_pool": len(captions) * n,
        **{f"images_{what}_this_run": c for what, c in counts.items()},
        "pool": str(files.pool),
    }
    if not protocol.fidelity:
        rows = [{"split": split, "k": k, "blur_radius": None, **per_k[k]} for k in chosen]
        return {"rows": rows, "info": info}
    rows = _fidelity_rows(protocol, files, split, chosen, per_k, len(captions), references)
    return {"rows": rows, "info": info}


def _key(value: dict) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _rerank(reranker: Reranker, paths: list[list[Path]], captions: list[str], split: str):
    """(captions, N) reranker scores of every candidate, read back from its PNG."""
    n = len(paths[0])
    scores = torch.empty(len(captions), n)
    rows_per_batch = max(1, 256 // n)
    for start in tqdm(range(0, len(captions), rows_per_batch), desc=f"{split}: reranking"):
        rows = paths[start : start + rows_per_batch]
        images = load_images([p for row in rows for p in row])
        texts = [captions[i] for i in range(start, start + len(rows)) for _ in range(n)]
        scores[start : start + len(rows)] = reranker.score(images, texts).view(len(rows), n)
    return scores


def _copy_chosen(paths: list[list[Path]], chosen: torch.Tensor, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, j in enumerate(chosen.tolist()):
        target = folder / f"{i:06d}.png"
        shutil.copyfile(paths[i][j], target)
        out.append(target)
    return out


def _save_samples(out_dir: Path, split: str, rows: list, counts: list, captions: list) -> None:
    """samples_<split>.png: the first 8 captions' chosen images, one row per k."""
    grid = make_grid(torch.cat(rows), nrow=min(8, len(captions)), pad_value=0.5)
    save_image(grid, out_dir / f"samples_{split}.png")
    (out_dir / f"samples_{split}.txt").write_text(
        "rows: best of k = " + ", ".join(map(str, counts)) + "\n" + "\n".join(captions[:8]) + "\n"
    )


def _fidelity_rows(
    protocol: ProtocolConfig,
    files: Candidates,
    split: str,
    chosen: dict,
    per_k: dict,
    num_captions: int,
    references: dict | None,
) -> list[dict]:
    """FID and IS of every best-of-k set against the real images (or their reference
    statistics), both blurred alike."""
    weights = protocol.inception_weights
    weights_tag = None  # names the real images' feature cache; not needed with references
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    jobs = [(r, k) for r in protocol.blur_radii for k in chosen]
    for radius, k in tqdm(jobs, desc=f"{split}: FID/IS"):
        real, fake = files.real, files.chosen(k)
        if radius:
            fake = blur_folder(fake, files.split_dir / f"best_of_{k}_blur{radius}", radius)
        common = dict(
            inception_weights=weights,
            device=device,
            isc_splits=min(protocol.isc_splits, num_captions),
        )
        if references is not None:
            stats = references[(split, radius)][0]
            metrics = fid_and_is(fake, None, reference=stats, **common)
        else:
            if radius:
                real = blur_folder(real, files.pool / f"real_blur{radius}", radius)
            if weights_tag is None:
                weights_tag = file_sha256(weights)[:12] if weights else "download"
            cache = (files.pool / "fidelity_cache", f"real_blur{radius}_{weights_tag}")
            metrics = fid_and_is(fake, real, real_cache=cache, **common)
        rows.append({"split": split, "k": k, "blur_radius": radius, **metrics, **per_k[k]})
    return rows


def load_references(
    protocol: ProtocolConfig, identity: dict, seed: int, image_size: int
) -> dict[tuple[str, float], tuple[dict, dict]]:
    """{(split, radius): (statistics, record)} from `protocol.fid_reference`, each checked
    against this run's protocol (`reference_stats.load` refuses the first field that differs)."""
    sha = inception_sha256(protocol.inception_weights)
    out = {}
    for split in protocol.splits:
        for radius in protocol.blur_radii:
            expected = reference_stats.protocol(
                identity, split, seed, protocol.num_captions, image_size, radius, sha
            )
            out[(split, radius)] = reference_stats.load(protocol.fid_reference, expected)
    return out


def flat_metrics(rows: list[dict]) -> dict:
    """metrics.json's flat view: <split>/fid_k<k>_blur<r>, <split>/is_k<k>, <split>/clip_score_k<k>
    and, on shapes, <split>/attribute_accuracy_k<k>."""
    flat = {}
    for r in rows:
        split, k = r["split"], r["k"]
        if r["blur_radius"] is not None:
            flat[f"{split}/fid_k{k}_blur{r['blur_radius']}"] = r["fid"]
        if r["blur_radius"] == 0:
            flat[f"{split}/is_k{k}"] = r["is_mean"]
        flat[f"{split}/clip_score_k{k}"] = r["clip_score"]
        if r.get("attribute_accuracy") is not None:
            flat[f"{split}/attribute_accuracy_k{k}"] = r["attribute_accuracy"]
    return flat


def evaluate_metrics(
    protocol: ProtocolConfig,
    sampling: SamplingConfig,
    batch_size: int,
    seed: int,
    model: DALLE,
    ckpt_path: str,
    reranker: Reranker,
    datamodule: ImageTextDataModule,
    log_dir: Path,
    out_dir: Path,
) -> dict:
    """Every split of `protocol`: the report files in `out_dir` and metrics.json's entries."""
    ckpt_sha = file_sha256(ckpt_path)
    references = None
    if protocol.fid_reference is not None:  # checked before any work
        references = load_references(
            protocol, datamodule.identity(), seed, model.dvae.config.image_size
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    pool_key = {
        "dalle_sha256": ckpt_sha,
        "data": datamodule.identity(),
        "seed": seed,
        "num_captions": protocol.num_captions,
        "sampling": {**asdict(sampling), "batch_size": batch_size},
    }
    rows, info = [], {}
    for split in protocol.splits:
        result = evaluate_split(
            protocol, sampling, batch_size, seed, model, reranker, datamodule, split,
            pool_key, log_dir, out_dir, references,
        )  # fmt: skip
        rows += result["rows"]
        info[split] = result["info"]
    size = model.dvae.config.image_size
    record = {
        "checkpoint": {"path": ckpt_path, "sha256": ckpt_sha},
        "dataset": datamodule.identity(),
        "splits": list(protocol.splits),
        "seed": seed,
        "num_captions": protocol.num_captions,
        "caption_sampling": "distinct captions of the split, random.Random(seed).sample",
        "resize": f"dataset eval transform: short side resized, centre crop to {size} px",
        "image_size": size,
        "rerank_counts": list(protocol.rerank_counts),
        "blur_radii": list(protocol.blur_radii),
        "blur": "PIL GaussianBlur(radius px) on generated and real images alike",
        "reranker": reranker.describe(),
        "sampling": {**asdict(sampling), "batch_size": batch_size},
        "fid_backend": f"torch-fidelity {torch_fidelity.__version__}",
        "fidelity": protocol.fidelity,
        "inception_weights": weights_record(protocol.inception_weights)
        if protocol.fidelity
        else None,
        "isc_splits": protocol.isc_splits,
        "fid_reference": {f"{split}/blur{r:g}": rec for (split, r), (_, rec) in references.items()}
        if references
        else None,
        "per_split": info,
    }
    files = write_report(out_dir, rows, record)
    print(files["md"].read_text(), flush=True)
    for name, path in files.items():
        log.info("%s: %s", name, path)
    return {
        "checkpoints": {"evaluated": ckpt_path},
        "protocol": record,
        "files": {k: str(v) for k, v in files.items()},
        "metrics": flat_metrics(rows),
    }
