"""`metrics.json`: what every run leaves in its run directory.

{
  "task_name", "run_dir", "wall_time_s", "global_step",
  "metrics": {"train/loss": ..., "val/psnr": ..., "test/psnr": ...},   # final values
  "optimized_metric": {"name", "value"},
  "checkpoints": {"best", "last"},                                     # paths or null
  "overrides": [...]                                                  # the command line
}
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf


def _number(value) -> float | None:
    value = float(value.item() if hasattr(value, "item") else value)
    return value if math.isfinite(value) else None


def collect_metrics(
    cfg: DictConfig, trainer: pl.Trainer, fit_metrics: dict, test_metrics: dict, wall_time: float
) -> dict:
    metrics = {k: _number(v) for k, v in sorted({**fit_metrics, **test_metrics}.items())}
    ckpt = trainer.checkpoint_callback
    last = Path(ckpt.dirpath) / "last.ckpt" if ckpt and ckpt.dirpath else None
    name = cfg.get("optimized_metric")
    return {
        **run_header(cfg, wall_time),
        "global_step": trainer.global_step,
        "metrics": metrics,
        "optimized_metric": {"name": name, "value": metrics.get(name)},
        "checkpoints": {
            "best": (ckpt.best_model_path or None) if ckpt else None,
            "last": str(last) if last is not None and last.is_file() else None,
        },
    }


def run_header(cfg: DictConfig, wall_time: float) -> dict:
    """What every metrics.json starts with."""
    return {
        "task_name": cfg.get("task_name"),
        "run_dir": str(cfg.paths.output_dir),
        "wall_time_s": round(wall_time, 1),
        "overrides": _overrides(),
    }


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(OmegaConf.to_container(HydraConfig.get().overrides.task))


def write_metrics(path: Path, summary: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")


def latest_checkpoint(log_dir: str | Path, task_name: str) -> Path | None:
    """The best (else last) checkpoint of the newest finished run of `task_name` under
    `log_dir` (runs and sweep jobs); a run is finished once it wrote its metrics.json."""
    root = Path(log_dir) / task_name
    summaries = sorted(root.glob("**/metrics.json"), key=lambda p: p.stat().st_mtime)
    for path in reversed(summaries):
        try:
            checkpoints = json.loads(path.read_text()).get("checkpoints") or {}
        except (OSError, ValueError):
            continue
        for key in ("best", "last"):
            if checkpoints.get(key) and Path(checkpoints[key]).is_file():
                return Path(checkpoints[key])
    return None
