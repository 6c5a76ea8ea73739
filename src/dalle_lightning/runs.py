"""Run directories: where a run writes, which run to resume or read, and its metrics.json.

Every run gets `logs/<task_name>/runs/<timestamp>/` (sweeps: `logs/<task_name>/multiruns/
<timestamp>/<job>/`); Hydra picks it through the `dalle_run_dir` resolver
(conf/hydra/default.yaml).

- Discovery: `latest_checkpoint` finds the newest finished run of a task (one that wrote its
  metrics.json): `model=dalle` takes the newest dVAE, `evaluate.py` the newest prior.
- Resume: with `resume=true` (or `ckpt_path=last`) the run directory is the newest one of the
  task holding `checkpoints/last.ckpt`, so checkpoints, loggers (CSV rows before the
  checkpoint's step are kept; TensorBoard appends to the same folder and purges the killed
  run's later events; W&B resumes the run whose id the run directory fixes) and metrics.json
  continue in place. A SLURM job that SLURM requeued (`SLURM_RESTART_COUNT` > 0: after a
  pre-emption, or on SLURM's requeue signal) resumes by itself, from the last.ckpt its
  SIGTERM or requeue signal wrote (`callbacks/preemption.py`), or starts afresh if it has none.
  `checkpoint_to_resume` finds the file (train.py's checks before Lightning) and
  `resume_checkpoint` reads its step; Lightning restores the model,
  optimizer, LR schedulers, callbacks and loops, and the resumable training loader
  (data/resumable.py) and `StepSeed` make the data order and random draws continue as if the
  run had never stopped.
- Summary: `collect_metrics` and `write_metrics` make every run's metrics.json:

    {
      "task_name", "run_dir", "wall_time_s", "global_step",
      "metrics": {"train/loss": ..., "val/psnr": ..., "test/psnr": ...},   # final values
      "optimized_metric": {"name", "value"},
      "checkpoints": {"best", "last"},                                     # paths or null
      "overrides": [...]                                                  # the command line
    }
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf, open_dict

from dalle_lightning.checkpoints import (
    checkpoint_exists,
    is_sharded,
    read_checkpoint,
    read_sharded_meta,
)
from dalle_lightning.config import ConfigError

if TYPE_CHECKING:  # Lightning loads after the command line's checks (cli.py)
    import lightning.pytorch as pl

log = logging.getLogger(__name__)
LAST = Path("checkpoints") / "last.ckpt"


def latest_resumable(runs: Path) -> Path | None:
    """The newest run directory under `runs` with a checkpoints/last.ckpt (names are times)."""
    found = sorted(p.parent.parent for p in runs.glob(f"*/{LAST}"))
    return found[-1] if found else None


def slurm_restarts() -> int:
    """How many times SLURM has requeued this job (0 outside SLURM or on its first start)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", 0))
    except ValueError:
        return 0


def run_dir(runs: str, resume, ckpt_path, stamp: str) -> str:
    if resume is True or ckpt_path == "last" or (slurm_restarts() and ckpt_path is None):
        found = latest_resumable(Path(runs))
        if found is not None:
            return str(found)
    return f"{runs}/{stamp}"  # nothing to resume: train() says so before any work


def run_id(output_dir: str) -> str:
    """A logger run id fixed by the run directory: a resumed run logs to the same W&B run."""
    return hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]


def register_resolvers() -> None:
    """The resolvers conf/ names: `dalle_run_dir` (hydra.run.dir: the run to resume) and
    `dalle_run_id` (a logger's run id). The entry scripts call this before Hydra composes,
    and again inside their main function, which is all a launcher's job process runs."""
    OmegaConf.register_new_resolver("dalle_run_dir", run_dir, replace=True)
    OmegaConf.register_new_resolver("dalle_run_id", run_id, replace=True)


def checkpoint_to_resume(cfg: DictConfig) -> Path | None:
    """The checkpoint a run restores, found but not read: `ckpt_path`, or its run's last.ckpt
    (resume=true, ckpt_path=last, a requeued SLURM job that has one), or None. Every problem
    is a ConfigError (`check_run` has made sure `resume` is a boolean)."""
    resume, ckpt_path = cfg.get("resume", False), cfg.get("ckpt_path")
    if resume and ckpt_path not in (None, "last"):
        raise ConfigError(
            "resume", resume, "false when ckpt_path is a file (pass one or the other)"
        )
    if ckpt_path == "best":
        raise ConfigError("ckpt_path", ckpt_path, "a checkpoint file, or last (= resume=true)")
    last = Path(cfg.paths.output_dir) / LAST
    if not resume and ckpt_path is None and slurm_restarts():
        return last if checkpoint_exists(last) else None
    if resume or ckpt_path == "last":
        if not checkpoint_exists(last):
            raise ConfigError(
                "resume",
                True,
                f"a run of {cfg.task_name} with {LAST} under "
                f"{Path(cfg.paths.output_dir).parent}: none found; start it without resume=true",
            )
        return last
    if ckpt_path is None:
        return None
    if not checkpoint_exists(ckpt_path):
        raise ConfigError("ckpt_path", ckpt_path, "an existing checkpoint file")
    return Path(ckpt_path)


def resume_checkpoint(cfg: DictConfig) -> tuple[str | None, int]:
    """(checkpoint to restore or None, its global step), read from the checkpoint."""
    path = checkpoint_to_resume(cfg)
    if not cfg.get("resume", False) and cfg.get("ckpt_path") is None and slurm_restarts():
        log.info(
            "SLURM requeued this job (restart %d): %s",
            slurm_restarts(),
            "resuming from its last.ckpt" if path else "no last.ckpt yet, starting afresh",
        )
    if path is None:
        return None, 0
    if is_sharded(path):  # trainer=fsdp: Lightning loads the shards, the step is in meta.pt
        ckpt = read_sharded_meta(path)
    else:
        ckpt = read_checkpoint(path, "ckpt_path", bool(cfg.get("trust_checkpoint")), mmap=True)
    step = int(ckpt.get("global_step", 0))
    log.info("resuming from %s (step %d)", path, step)
    return str(path), step


def resumed_logger_config(logger_cfg: DictConfig | None, step: int) -> DictConfig | None:
    """The logger configs of a run resumed in place: TensorBoard gets `purge_step`, so the
    events a killed run wrote after its checkpoint are dropped from its older files."""
    if not logger_cfg:
        return logger_cfg
    logger_cfg = logger_cfg.copy()
    for sub in logger_cfg.values():
        if str(sub.get("_target_", "")).endswith("TensorBoardLogger"):
            with open_dict(sub):
                sub.purge_step = step
    return logger_cfg


def continue_csv_logs(loggers: list, step: int) -> None:
    """Keep the rows a CSVLogger wrote before `step` (Lightning's writer would delete them).
    Rows carry the step index of the batch that logged them: the checkpoint at global step
    `step` holds the batches with indices below it, so those rows stay and the rest are
    written again by the resumed run."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        with path.open(newline="") as file:
            rows = [r for r in csv.DictReader(file) if r.get("step") and int(r["step"]) < step]
        writer = logger.experiment  # deletes the old file; the kept rows go back at its next save
        writer.metrics = [{k: v for k, v in r.items() if v != ""} for r in rows] + writer.metrics


# metrics.json -----------------------------------------------------------------------------------
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
            "last": str(last) if last is not None and checkpoint_exists(last) else None,
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
    """metrics.json, written whole or not at all (`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(summary, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """`text` to `path` through a temporary file and a rename: a full disk or a kill leaves
    the previous file (or none), never half a file. The temporary file is the process's own,
    so processes writing one path at once (the ranks of a DDP run) each replace it whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        partial.write_text(text)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


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
            if checkpoints.get(key) and checkpoint_exists(checkpoints[key]):
                return Path(checkpoints[key])
    return None
