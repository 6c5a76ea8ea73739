"""`sweep_summary.json`: one table of a multirun's jobs, written when the sweep ends.

A Hydra callback (conf/hydra/default.yaml). Every job of `python train.py -m ...` (or
`evaluate.py -m`) writes its own `<sweep dir>/<job>/metrics.json`; this reads them all, by any
launcher (in-process, submitit on SLURM), and writes:

{
  "sweep_dir", "optimized_metric", "direction",
  "best": {"job", "value", "overrides", "run_dir", "checkpoint"} | null,
  "jobs": [{"job", "overrides", "value", "wall_time_s", "metrics"}, ...],   # by job number
  "missing": ["3", ...]        # job dirs without a metrics.json (failed or still running)
}

The best job is the one whose `optimized_metric` is lowest (highest with an Optuna
`direction: maximize`); jobs that did not log it are listed but never best.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dalle_lightning.runs import write_metrics

log = logging.getLogger(__name__)


def summarize_sweep(sweep_dir: str | Path, direction: str = "minimize") -> dict:
    """Collect the jobs' metrics.json under `sweep_dir` (job dirs are numbered)."""
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction={direction!r}: use minimize or maximize")
    sweep_dir = Path(sweep_dir)
    job_dirs = sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()),
        key=lambda p: int(p.name),
    )
    jobs, missing, names = [], [], set()
    for job_dir in job_dirs:
        path = job_dir / "metrics.json"
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            missing.append(job_dir.name)
            continue
        optimized = summary.get("optimized_metric") or {}
        names.add(optimized.get("name"))
        jobs.append(
            {
                "job": job_dir.name,
                "overrides": summary.get("overrides", []),
                "value": optimized.get("value"),
                "wall_time_s": summary.get("wall_time_s"),
                "metrics": summary.get("metrics", {}),
                "run_dir": summary.get("run_dir"),
                "checkpoint": (summary.get("checkpoints") or {}).get("best"),
            }
        )
    scored = [j for j in jobs if j["value"] is not None]
    pick = min if direction == "minimize" else max
    best = pick(scored, key=lambda j: j["value"]) if scored else None
    names.discard(None)
    return {
        "sweep_dir": str(sweep_dir),
        "optimized_metric": sorted(names)[0] if len(names) == 1 else sorted(names),
        "direction": direction,
        "best": (
            {k: best[k] for k in ("job", "value", "overrides", "run_dir", "checkpoint")}
            if best
            else None
        ),
        "jobs": [{k: v for k, v in j.items() if k not in ("run_dir", "checkpoint")} for j in jobs],
        "missing": missing,
    }


def _direction(config: DictConfig) -> str:
    direction: Any = OmegaConf.select(config, "hydra.sweeper.direction", default="minimize")
    if isinstance(direction, list | tuple) or OmegaConf.is_list(direction):
        direction = direction[0]  # multi-objective: rank by the first
    return getattr(direction, "name", str(direction))


class SweepSummary(Callback):
    """Writes `<sweep dir>/sweep_summary.json` and logs one line per job when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        summary = summarize_sweep(sweep_dir, _direction(config))
        path = sweep_dir / "sweep_summary.json"
        write_metrics(path, summary)
        metric = summary["optimized_metric"]
        overrides = [set(job["overrides"]) for job in summary["jobs"]]
        shared = set.intersection(*overrides) if overrides else set()
        for job in summary["jobs"]:  # only what differs between the jobs
            varied = " ".join(o for o in job["overrides"] if o not in shared)
            log.info("job %s: %s = %s  %s", job["job"], metric, job["value"], varied)
        if summary["missing"]:
            log.warning("jobs without a metrics.json: %s", ", ".join(summary["missing"]))
        if best := summary["best"]:
            log.info(
                "best: job %s, %s = %s, run %s", best["job"], metric, best["value"], best["run_dir"]
            )
        log.info("sweep summary: %s", path)
