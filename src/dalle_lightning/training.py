"""`train(cfg)`: what `python train.py` runs, top to bottom.

seed -> datamodule (stage 2: over cached dVAE codes) -> module -> callbacks -> loggers
-> trainer -> fit -> test -> metrics.json.
Every object comes from the composed Hydra config (conf/train.yaml); every value is checked
while the objects are built, before the first step.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig

from dalle_lightning.instantiate import build, build_all, check_ckpt_path, check_trainer
from dalle_lightning.modules.dalle_module import DalleModule
from dalle_lightning.run_summary import collect_metrics, write_metrics

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> tuple[float | None, dict]:
    """Fit and test the configured module; returns (value of cfg.optimized_metric, summary)."""
    started = time.time()
    check_trainer(cfg)
    check_ckpt_path(cfg.get("ckpt_path"))
    output_dir = Path(cfg.paths.output_dir)

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    log.info("seed: %s", cfg.seed)
    datamodule = build(cfg.dataset, "dataset")
    module = build(cfg.model, "model")
    if isinstance(module, DalleModule):  # stage 2 reads cached dVAE codes, never pixels
        datamodule = module.token_datamodule(datamodule)
    loggers = build_all(cfg.get("logger"), "logger")
    callbacks = build_all(cfg.get("callbacks"), "callbacks")
    if not loggers:  # nothing to monitor the learning rate into
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
    log.info("run directory: %s", output_dir)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    fit_metrics = dict(trainer.callback_metrics)

    test_metrics: dict = {}
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("no best checkpoint was saved; testing the current weights")
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
        test_metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("test/")}

    summary = collect_metrics(cfg, trainer, fit_metrics, test_metrics, time.time() - started)
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
