"""`evaluate(cfg)`: what `python evaluate.py` runs.

`task=metrics` (default): FID/IS over CLIP rerank counts and blur radii, with attribute
accuracy on shapes (see `evaluation/rerank_metrics.py`).
`task=generate`: images for captions from a stage-2 checkpoint (see `generating.py`).
`task=attributes`: best-of-1 attribute-checker accuracy of generated shapes, with the real
and dVAE-reconstructed images as references (see `evaluation/attribute_accuracy.py`).
`task=reconstruction`: a dVAE checkpoint's reconstruction quality on a dataset split with
hard (argmax) codes: NLL, KL, PSNR, codebook perplexity and usage, written to metrics.json.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig

from dalle_lightning.checkpoint_file import read_checkpoint
from dalle_lightning.config import require, require_choice
from dalle_lightning.evaluation.attribute_accuracy import attribute_accuracy
from dalle_lightning.evaluation.rerank_metrics import evaluate_metrics
from dalle_lightning.generating import generate, load_dalle
from dalle_lightning.instantiate import build, build_all, check_run, check_trainer
from dalle_lightning.resume import register_resolvers
from dalle_lightning.run_summary import collect_metrics, write_metrics

log = logging.getLogger(__name__)
# conf/'s resolvers, on import: before train.py/evaluate.py compose the config, and in a
# launcher's job processes, which import this module but run no entry script
register_resolvers()

TASKS = ("metrics", "generate", "attributes", "reconstruction")
SPLITS = ("train", "val", "test", "heldout")


def evaluate(cfg: DictConfig) -> dict:
    started = time.time()
    require_choice("task", cfg.task, TASKS)
    check_run(cfg)  # seed, trust_checkpoint
    if cfg.task == "generate":
        return generate(cfg)
    if cfg.task == "attributes":
        return attribute_accuracy(cfg, *load_dalle(cfg))
    if cfg.task == "metrics":
        return evaluate_metrics(cfg)
    require_choice("split", cfg.split, SPLITS)
    ckpt_path = cfg.get("ckpt_path")
    require(
        ckpt_path is not None and Path(ckpt_path).is_file(),
        "ckpt_path",
        ckpt_path,
        "an existing checkpoint, e.g. logs/train_dvae/runs/<timestamp>/checkpoints/last.ckpt",
    )
    check_trainer(cfg)

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    log.info("seed: %s", cfg.seed)
    datamodule = build(cfg.dataset, "dataset")
    module_class = hydra.utils.get_class(cfg.model._target_)
    read_checkpoint(ckpt_path, trusted=cfg.trust_checkpoint, mmap=True)  # names a bad file
    module = module_class.load_from_checkpoint(
        ckpt_path, map_location="cpu", weights_only=not cfg.trust_checkpoint
    )
    loggers = build_all(cfg.get("logger"), "logger")
    callbacks = build_all(cfg.get("callbacks"), "callbacks")
    trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)

    trainer.test(module, dataloaders=datamodule.split_dataloader(cfg.split))
    metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    summary = collect_metrics(cfg, trainer, {}, metrics, time.time() - started)
    summary.update(split=cfg.split, checkpoints={"evaluated": str(ckpt_path)})
    write_metrics(Path(cfg.paths.output_dir) / "metrics.json", summary)
    log.info("metrics: %s", Path(cfg.paths.output_dir) / "metrics.json")
    return summary
