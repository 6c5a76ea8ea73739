"""`python evaluate.py [task=metrics]`: FID and IS over CLIP rerank counts and blur radii
(Ramesh et al., 2021, sec. 3.1-3.2, Fig. 9), the protocol pinned and recorded.

For each evaluation split (`splits`; shapes: seen `test` and held-out `heldout` pairs):
1. `num_captions` distinct captions drawn with `seed` (`candidates.sample_captions`);
2. the split's real images of those captions, as the dataset's eval transform gives them
   (resize the short side, centre crop to the model's resolution), written as PNGs;
3. N = max(rerank_counts) candidates per caption, generated once into a pool keyed by
   everything that decides them (resumable, `candidates.generate_pool`);
4. every candidate scored by the reranker, read back from its PNG; best-of-k for each k takes
   the best of the first k (`sampling/rerank.best_of_k`): the sweep costs one generation;
5. FID and IS (torch-fidelity) of each best-of-k set against the real images, both blurred
   with each radius of `blur_radii`; on shapes also the attribute-checker accuracy;
6. results.json/csv/md, fid_vs_rerank.png, fid_vs_blur.png, samples_<split>.png, metrics.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch
import torch_fidelity
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from dalle_lightning.config import require, require_bool, require_int
from dalle_lightning.data.token_cache import file_sha256
from dalle_lightning.evaluation.attribute_accuracy import score as attribute_score
from dalle_lightning.evaluation.candidates import candidate_paths, generate_pool, sample_captions
from dalle_lightning.evaluation.fidelity import (
    blur_folder,
    fid_and_is,
    load_images,
    save_images,
    weights_record,
)
from dalle_lightning.evaluation.report import write_report
from dalle_lightning.generating import load_dalle
from dalle_lightning.instantiate import build
from dalle_lightning.run_summary import run_header, write_metrics
from dalle_lightning.sampling.rerank import best_of_k

log = logging.getLogger(__name__)


def check_protocol(cfg: DictConfig) -> None:
    counts, radii = list(cfg.rerank_counts), list(cfg.blur_radii)
    require(
        counts and all(isinstance(k, int) and k >= 1 for k in counts),
        "rerank_counts",
        counts,
        "a non-empty list of integers >= 1, e.g. [1,2,4,8,16]",
    )
    require(
        radii and all(isinstance(r, (int, float)) and r >= 0 for r in radii),
        "blur_radii",
        radii,
        "a non-empty list of numbers >= 0, e.g. [0,1,2,4,8]",
    )
    if cfg.num_captions is not None:
        require_int("num_captions", cfg.num_captions, 2)  # FID needs two images
    require(
        len(cfg.splits) > 0 and all(isinstance(s, str) for s in cfg.splits),
        "splits",
        cfg.splits,
        "a non-empty list of split names",
    )
    require_int("sampling.batch_size", cfg.sampling.batch_size, 1)
    require_int("isc_splits", cfg.isc_splits, 1)
    require_bool("fidelity", cfg.fidelity)
    if cfg.inception_weights is not None:
        require(
            Path(cfg.inception_weights).is_file(),
            "inception_weights",
            cfg.inception_weights,
            "an existing torch-fidelity Inception weights file (or null: torch-fidelity "
            "downloads its own)",
        )


def _key(value: dict) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _copy_chosen(paths: list[list[Path]], chosen: torch.Tensor, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, j in enumerate(chosen.tolist()):
        target = folder / f"{i:06d}.png"
        shutil.copyfile(paths[i][j], target)
        out.append(target)
    return out


def evaluate_split(cfg, model, reranker, datamodule, split: str, ckpt_sha: str) -> dict:
    dataset = datamodule.datasets[split]
    pairs = sample_captions(dataset, cfg.num_captions, cfg.seed)
    captions = [c for _, c in pairs]
    n = max(cfg.rerank_counts)
    sampling = {k: v for k, v in cfg.sampling.items() if k != "batch_size"}
    pool_key = {
        "dalle_sha256": ckpt_sha,
        "data": datamodule.identity(),
        "split": split,
        "seed": cfg.seed,
        "num_captions": cfg.num_captions,
        "candidates": n,
        "sampling": OmegaConf.to_container(cfg.sampling),
    }
    pool = Path(cfg.paths.log_dir) / "eval_pools" / _key(pool_key)
    pool.mkdir(parents=True, exist_ok=True)
    (pool / "key.json").write_text(json.dumps(pool_key, indent=2, default=str) + "\n")
    (pool / "captions.json").write_text(json.dumps(pairs, indent=0) + "\n")  # [image, caption]

    real_dir = pool / "real"
    unique = list(dict.fromkeys(i for i, _ in pairs))  # each real image once
    if len(list(real_dir.glob("*.png"))) != len(unique):
        log.info("%s: writing %d real images", split, len(unique))
        for start in range(0, len(unique), 64):
            idx = unique[start : start + 64]
            images = torch.stack([dataset[i]["image"] for i in idx])
            save_images(images, real_dir, names=[f"{i:06d}" for i in idx])

    counts = generate_pool(
        model, captions, n, pool / "candidates", cfg.seed, split, sampling, cfg.sampling.batch_size
    )
    paths = candidate_paths(pool / "candidates", len(captions), n)
    scores = torch.empty(len(captions), n)
    rows_per_batch = max(1, 256 // n)
    for start in tqdm(range(0, len(captions), rows_per_batch), desc=f"{split}: reranking"):
        rows = paths[start : start + rows_per_batch]
        images = load_images([p for row in rows for p in row])
        texts = [captions[i] for i in range(start, start + len(rows)) for _ in range(n)]
        scores[start : start + len(rows)] = reranker.score(images, texts).view(len(rows), n)
    chosen = best_of_k(scores, list(cfg.rerank_counts))

    split_dir = Path(cfg.paths.output_dir) / split
    records = None
    if "record" in dataset[pairs[0][0]]:  # the built-in shapes: attribute records
        records = [dataset[i]["record"] for i, _ in pairs]
    rows, per_k = [], {}
    sample_rows = []
    for k, index in chosen.items():
        best = _copy_chosen(paths, index, split_dir / f"best_of_{k}")
        images = load_images(best)
        sample_rows.append(images[:8])
        per_k[k] = {
            "clip_score": float(scores.gather(1, index[:, None]).mean()),
            "attribute_accuracy": attribute_score(images, records)["accuracy"] if records else None,
        }
    save_image(
        make_grid(torch.cat(sample_rows), nrow=min(8, len(captions)), pad_value=0.5),
        Path(cfg.paths.output_dir) / f"samples_{split}.png",
    )
    (Path(cfg.paths.output_dir) / f"samples_{split}.txt").write_text(
        "rows: best of k = " + ", ".join(map(str, chosen)) + "\n" + "\n".join(captions[:8]) + "\n"
    )

    info = {
        "captions": len(captions),
        "real_images": len(unique),
        "candidates_per_caption": n,
        "images_in_pool": len(captions) * n,
        **{f"images_{what}_this_run": c for what, c in counts.items()},
        "pool": str(pool),
    }
    if not cfg.fidelity:
        rows = [{"split": split, "k": k, "blur_radius": None, **per_k[k]} for k in chosen]
        return {"rows": rows, "info": info}
    weights = cfg.inception_weights
    weights_tag = file_sha256(weights)[:12] if weights else "download"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    jobs = [(r, k) for r in cfg.blur_radii for k in chosen]
    for radius, k in tqdm(jobs, desc=f"{split}: FID/IS"):
        real = (
            real_dir if radius == 0 else blur_folder(real_dir, pool / f"real_blur{radius}", radius)
        )
        fake = split_dir / f"best_of_{k}"
        if radius:
            fake = blur_folder(fake, split_dir / f"best_of_{k}_blur{radius}", radius)
        metrics = fid_and_is(
            fake,
            real,
            inception_weights=weights,
            device=device,
            isc_splits=min(cfg.isc_splits, len(captions)),
            real_cache=(pool / "fidelity_cache", f"real_blur{radius}_{weights_tag}"),
        )
        rows.append({"split": split, "k": k, "blur_radius": radius, **metrics, **per_k[k]})
    return {"rows": rows, "info": info}


def _flat_metrics(rows: list[dict]) -> dict:
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


def evaluate_metrics(cfg: DictConfig) -> dict:
    started = time.time()
    check_protocol(cfg)
    model, ckpt_path = load_dalle(cfg)
    datamodule = build(cfg.dataset, "dataset")
    datamodule.setup()
    size = model.dvae.config.image_size
    require(
        cfg.dataset.image_size == size,
        "dataset.image_size",
        cfg.dataset.image_size,
        f"the model's resolution, {size} (real images are resized to it)",
    )
    for split in cfg.splits:
        require(
            split in datamodule.datasets,
            "splits",
            list(cfg.splits),
            "splits of this dataset: " + ", ".join(datamodule.datasets),
        )
    reranker = build(cfg.reranker, "reranker")
    trained_on = reranker.describe().get("trained_on")
    if trained_on is not None and trained_on != datamodule.identity():
        log.warning(
            "the reranker was trained on other data (%s) than this evaluation's (%s): train one "
            "with `python train.py model=clip dataset=...` or use reranker=open_clip",
            trained_on.get("dataset"),
            datamodule.identity().get("dataset"),
        )
    ckpt_sha = file_sha256(ckpt_path)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    rows, info = [], {}
    for split in cfg.splits:
        result = evaluate_split(cfg, model, reranker, datamodule, split, ckpt_sha)
        rows += result["rows"]
        info[split] = result["info"]
    protocol = {
        "checkpoint": {"path": ckpt_path, "sha256": ckpt_sha},
        "dataset": datamodule.identity(),
        "splits": list(cfg.splits),
        "seed": cfg.seed,
        "num_captions": cfg.num_captions,
        "caption_sampling": "distinct captions of the split, random.Random(seed).sample",
        "resize": f"dataset eval transform: short side resized, centre crop to {size} px",
        "image_size": size,
        "rerank_counts": list(cfg.rerank_counts),
        "blur_radii": list(cfg.blur_radii),
        "blur": "PIL GaussianBlur(radius px) on generated and real images alike",
        "reranker": reranker.describe(),
        "sampling": OmegaConf.to_container(cfg.sampling),
        "fid_backend": f"torch-fidelity {torch_fidelity.__version__}",
        "fidelity": cfg.fidelity,
        "inception_weights": weights_record(cfg.inception_weights) if cfg.fidelity else None,
        "isc_splits": cfg.isc_splits,
        "per_split": info,
    }
    files = write_report(out_dir, rows, protocol)
    summary = run_header(cfg, time.time() - started)
    summary.update(
        checkpoints={"evaluated": ckpt_path},
        protocol=protocol,
        files={k: str(v) for k, v in files.items()},
        metrics=_flat_metrics(rows),
    )
    write_metrics(out_dir / "metrics.json", summary)
    print(files["md"].read_text(), flush=True)
    for name, path in files.items():
        log.info("%s: %s", name, path)
    return summary
