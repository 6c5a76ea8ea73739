"""`python evaluate.py task=generate`: images for captions from a stage-2 checkpoint.

Writes one PNG grid per prompt (`num_images` samples, seeded by `seed`) under
<run dir>/generated/, prints each path, and records them in metrics.json.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from torchvision.utils import make_grid, save_image

from dalle_lightning.config import ConfigError, require, require_int
from dalle_lightning.models.dalle import DALLE
from dalle_lightning.run_summary import latest_checkpoint, run_header, write_metrics
from dalle_lightning.sampling.generate import SAMPLING_DEFAULTS, check_sampling, resolve_sampling

log = logging.getLogger(__name__)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "prompt"


def load_dalle(cfg: DictConfig) -> tuple[DALLE, str]:
    """The stage-2 model of `ckpt_path` (default: the newest finished train_dalle run).

    The sampling settings given are checked before loading; those left null then take the
    checkpoint's own (what it was trained for) and `cfg.sampling` is filled in with them, so
    every later step and the run's metrics.json see the settings actually used."""
    sampling = dict(cfg.sampling)
    require_int("sampling.batch_size", sampling.pop("batch_size"), 1)
    given = {k: v for k, v in sampling.items() if v is not None}
    try:
        check_sampling(**{**SAMPLING_DEFAULTS, **given})
    except ConfigError as err:
        raise err.at("sampling") from None
    ckpt_path = cfg.get("ckpt_path") or latest_checkpoint(cfg.paths.log_dir, "train_dalle")
    require(
        ckpt_path is not None and Path(ckpt_path).is_file(),
        "ckpt_path",
        cfg.get("ckpt_path"),
        "a stage-2 checkpoint (none found under logs/train_dalle: run "
        "`python train.py model=dalle` first)",
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log.info("DALL-E checkpoint: %s (%s)", ckpt_path, device)
    try:
        trusted = bool(cfg.get("trust_checkpoint", False))
        model = DALLE.from_checkpoint(ckpt_path, device, trusted)
    except RuntimeError as err:
        raise ConfigError("ckpt_path", str(ckpt_path), str(err)) from None
    try:
        resolved = resolve_sampling(sampling, model.sampling, model.caption_dropout > 0)
    except ConfigError as err:
        raise err.at("sampling") from None
    with open_dict(cfg):
        cfg.sampling.update(resolved)
    log.info("sampling: %s", ", ".join(f"{k} {v}" for k, v in resolved.items()))
    return model, str(ckpt_path)


def generate(cfg: DictConfig) -> dict:
    started = time.time()
    prompts = cfg.get("prompts")
    require(
        isinstance(prompts, (list, ListConfig))
        and len(prompts) > 0
        and all(isinstance(p, str) for p in prompts),
        "prompts",
        prompts,
        """a non-empty list of captions, e.g. prompts='["a red circle on the left"]'""",
    )
    require_int("num_images", cfg.num_images, 1)
    model, ckpt_path = load_dalle(cfg)

    out_dir = Path(cfg.paths.output_dir) / "generated"
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, prompt in enumerate(prompts):
        images = model.generate(
            [prompt],
            cfg.num_images,
            seed=cfg.seed + i,
            **cfg.sampling,
        )
        path = out_dir / f"{i:03d}_{_slug(prompt)}.png"
        nrow = min(cfg.num_images, 8)
        save_image(make_grid(images, nrow=nrow, padding=2, pad_value=0.5), path)
        files.append({"prompt": prompt, "png": str(path)})
        print(path, flush=True)

    summary = run_header(cfg, time.time() - started)
    summary.update(
        checkpoints={"evaluated": str(ckpt_path)},
        sampling=OmegaConf.to_container(cfg.sampling),
        generated=files,
    )
    write_metrics(Path(cfg.paths.output_dir) / "metrics.json", summary)
    return summary
