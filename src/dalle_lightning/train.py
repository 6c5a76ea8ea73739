"""`train(cfg)`: what `python train.py` runs, top to bottom.

checks -> seed -> the stage's datamodule and module (`stages.py`) -> callbacks -> loggers
-> trainer -> fit -> test -> metrics.json.
Every object comes from the composed Hydra config (conf/train.yaml); every value is checked
before the first step: first what needs no built object (`preflight.check_train`), the rest
while the objects are built.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig

from dalle_lightning.allocator import keep_freed_memory
from dalle_lightning.instantiate import build, build_all, check_monitored
from dalle_lightning.lightning_messages import route_lightning_messages
from dalle_lightning.preflight import check_train
from dalle_lightning.runs import (
    collect_metrics,
    continue_csv_logs,
    resume_checkpoint,
    resumed_logger_config,
    write_metrics,
)
from dalle_lightning.stages import build_stage

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> tuple[float | None, dict]:
    """Fit and test the configured module; returns (value of cfg.optimized_metric, summary)."""
    started = time.monotonic()
    keep_freed_memory()  # CPU steps reuse freed memory (allocator.py)
    route_lightning_messages()  # each of Lightning's lines once, no tips
    check_train(cfg)  # train.py ran it before importing Lightning; direct callers did not
    ckpt_path, resumed_step = resume_checkpoint(cfg)
    output_dir = Path(cfg.paths.output_dir)

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    log.info("seed: %s", cfg.seed)
    datamodule, module, inputs = build_stage(cfg)
    check_monitored(cfg.get("optimized_metric"), module)
    in_place = ckpt_path is not None and output_dir == Path(ckpt_path).parent.parent
    logger_cfg = resumed_logger_config(cfg.get("logger"), resumed_step) if in_place else None
    loggers = build_all(logger_cfg or cfg.get("logger"), "logger")
    if in_place:  # resumed in its own run dir: the logs continue
        continue_csv_logs(loggers, resumed_step)
    callbacks = build_all(cfg.get("callbacks"), "callbacks")
    if not loggers:  # nothing to monitor the learning rate into
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
    log.info("run directory: %s", output_dir)

    trainer.fit(
        module,
        datamodule=datamodule,
        ckpt_path=ckpt_path,
        weights_only=not cfg.get("trust_checkpoint", False),
    )
    fit_metrics = dict(trainer.callback_metrics)

    test_metrics: dict = {}
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("no best checkpoint was saved; testing the current weights")
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
        test_metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("test/")}

    summary = collect_metrics(cfg, trainer, fit_metrics, test_metrics, time.monotonic() - started)
    if report := datamodule.data_report():
        summary["data"] = report  # bad images and captions: skipped and converted counts
    if inputs:
        summary["inputs"] = inputs  # the artefacts the stage was built from (the dVAE)
    if ckpt_path:
        summary["resumed_from"] = {"checkpoint": ckpt_path, "step": resumed_step}
    if trainer.is_global_zero:  # one file per run: rank 0's (the ranks share the run dir)
        write_metrics(output_dir / "metrics.json", summary)
        log.info("metrics: %s", output_dir / "metrics.json")
    metric_name, value = summary["optimized_metric"]["name"], summary["optimized_metric"]["value"]
    if metric_name and value is None:
        log.warning(
            "optimized_metric %r was not logged (logged: %s); a sweep gets None for this run",
            metric_name,
            ", ".join(sorted(summary["metrics"])),
        )
    return value, summary
