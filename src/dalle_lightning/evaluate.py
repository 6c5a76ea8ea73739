"""`evaluate(cfg)`: what `python evaluate.py` runs.

Each task's values are checked first (`preflight.check_evaluate`); the task then turns its
config into typed values and built objects here, at the edge, calls the task's library
function, and writes the run's metrics.json:

`task=metrics` (default): FID/IS over CLIP rerank counts and blur radii, with attribute
accuracy on shapes (`evaluation/rerank_metrics.py`).
`task=generate`: images for captions from a stage-2 checkpoint (`evaluation/generate.py`).
`task=attributes`: best-of-1 attribute-checker accuracy of generated shapes, with the real
and dVAE-reconstructed images as references (`evaluation/attribute_accuracy.py`).
`task=reference_stats`: the real images' Inception statistics with their protocol, for
`fid_reference=` (`evaluation/reference_stats.py`; also `python -m
dalle_lightning.evaluation.reference_stats`).
`task=reconstruction`: a dVAE checkpoint's reconstruction quality on a dataset split with
hard (argmax) codes: NLL, KL, PSNR, codebook perplexity and usage (the dVAE module's test
step, rebuilt from the checkpoint).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from dalle_lightning.allocator import keep_freed_memory
from dalle_lightning.checkpoints import read_checkpoint
from dalle_lightning.config import require
from dalle_lightning.data.shapes import ShapesDataModule
from dalle_lightning.evaluation import reference_stats
from dalle_lightning.evaluation.attribute_accuracy import attribute_accuracy, flat_metrics
from dalle_lightning.evaluation.generate import generate_grids
from dalle_lightning.evaluation.protocol import ProtocolConfig
from dalle_lightning.evaluation.rerank_metrics import evaluate_metrics
from dalle_lightning.instantiate import build, build_all
from dalle_lightning.lightning_messages import route_lightning_messages
from dalle_lightning.models.dalle import DALLE
from dalle_lightning.preflight import (
    check_evaluate,
    prior_checkpoint,
    protocol_config,
    sampling_request,
)
from dalle_lightning.runs import collect_metrics, run_header, write_metrics
from dalle_lightning.sampling.sampler import SamplingConfig, resolve_sampling
from dalle_lightning.stages import dvae_module

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict:
    started = time.monotonic()
    keep_freed_memory()  # as train.py does (allocator.py); generation speed is unchanged by it
    route_lightning_messages()  # each of Lightning's lines once, no tips
    check_evaluate(cfg)  # evaluate.py ran it before importing Lightning; direct callers did not
    task = {
        "metrics": _metrics,
        "generate": _generate,
        "attributes": _attributes,
        "reconstruction": _reconstruction,
        "reference_stats": _reference_stats,
    }[cfg.task]
    results = task(cfg)
    summary = {**run_header(cfg, time.monotonic() - started), **results}
    out_dir = Path(cfg.paths.output_dir)
    write_metrics(out_dir / "metrics.json", summary)
    log.info("metrics: %s", out_dir / "metrics.json")
    return summary


def load_prior(cfg: DictConfig) -> tuple[DALLE, str, SamplingConfig, int]:
    """(model, checkpoint path, sampling settings, sampling batch size) of `ckpt_path`
    (default: the newest finished train_dalle run).

    The sampling settings given are checked before loading; those left null then take the
    checkpoint's own (what it was trained for), and the log and metrics.json say which."""
    given, batch_size = sampling_request(cfg)
    ckpt_path = prior_checkpoint(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log.info("DALL-E checkpoint: %s (%s)", ckpt_path, device)
    model = DALLE.from_checkpoint(ckpt_path, device, bool(cfg.trust_checkpoint))
    sampling = resolve_sampling(given, model.sampling, model.caption_dropout > 0)
    log.info("sampling: %s", ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(sampling).items()))
    return model, str(ckpt_path), sampling, batch_size


def _sampling_record(sampling: SamplingConfig, batch_size: int) -> dict:
    return {**dataclasses.asdict(sampling), "batch_size": batch_size}


def _generate(cfg: DictConfig) -> dict:
    prompts = cfg.prompts
    model, ckpt_path, sampling, batch_size = load_prior(cfg)
    out_dir = Path(cfg.paths.output_dir) / "generated"
    files = generate_grids(
        model, list(prompts), cfg.num_images, sampling, cfg.seed, out_dir, batch_size
    )
    return {
        "checkpoints": {"evaluated": ckpt_path},
        "sampling": _sampling_record(sampling, batch_size),
        "generated": files,
    }


def _prior_and_data(
    cfg: DictConfig, setup: bool = True
) -> tuple[DALLE, str, SamplingConfig, int, Any]:
    """`load_prior`'s four, and the dataset at the model's resolution (its real images are
    compared with generated ones), set up unless `setup` is false."""
    model, ckpt_path, sampling, batch_size = load_prior(cfg)
    datamodule = build(cfg.dataset, "dataset")
    if setup:
        datamodule.setup()
    size = model.dvae.config.image_size
    require(
        cfg.dataset.image_size == size,
        "dataset.image_size",
        cfg.dataset.image_size,
        f"the model's resolution, {size} (the dVAE's image size)",
    )
    return model, ckpt_path, sampling, batch_size, datamodule


def _attributes(cfg: DictConfig) -> dict:
    model, ckpt_path, sampling, batch_size, datamodule = _prior_and_data(cfg)
    out_dir = Path(cfg.paths.output_dir)
    results = attribute_accuracy(
        model, datamodule, cfg.num_captions, sampling, cfg.seed, out_dir, batch_size
    )
    return {
        "checkpoints": {"evaluated": ckpt_path},
        "sampling": _sampling_record(sampling, batch_size),
        "attributes": results,
        "metrics": flat_metrics(results),
    }


def _check_splits(protocol: ProtocolConfig, datamodule: Any) -> None:
    for split in protocol.splits:
        require(
            split in datamodule.datasets,
            "splits",
            list(protocol.splits),
            "splits of this dataset: " + ", ".join(datamodule.datasets),
        )


def _metrics(cfg: DictConfig) -> dict:
    protocol = protocol_config(cfg)
    model, ckpt_path, sampling, batch_size, datamodule = _prior_and_data(cfg, setup=False)
    # with reference statistics the split's images are not needed (nor audited): only the
    # built-in shapes, rendered on the fly, still give their attribute records
    if protocol.fid_reference is None or isinstance(datamodule, ShapesDataModule):
        datamodule.setup()
        _check_splits(protocol, datamodule)
    reranker = build(cfg.reranker, "reranker")
    trained_on = reranker.describe().get("trained_on")
    if trained_on is not None and trained_on != datamodule.identity():
        log.warning(
            "the reranker was trained on other data (%s) than this evaluation's (%s): train one "
            "with `python train.py model=clip dataset=...` or use reranker=open_clip",
            trained_on.get("dataset"),
            datamodule.identity().get("dataset"),
        )
    return evaluate_metrics(
        protocol,
        sampling,
        batch_size,
        cfg.seed,
        model,
        ckpt_path,
        reranker,
        datamodule,
        Path(cfg.paths.log_dir),
        Path(cfg.paths.output_dir),
    )


def _reference_stats(cfg: DictConfig) -> dict:
    protocol = protocol_config(cfg)
    datamodule = build(cfg.dataset, "dataset")
    datamodule.setup()
    _check_splits(protocol, datamodule)
    folder = Path(cfg.paths.output_dir) / "reference"
    written = reference_stats.make(
        datamodule,
        protocol.splits,
        protocol.num_captions,
        cfg.seed,
        protocol.blur_radii,
        cfg.dataset.image_size,
        protocol.inception_weights,
        folder,
    )
    log.info("reference statistics: %s (use them with fid_reference=%s)", folder, folder)
    return {
        "reference": {"folder": str(folder), "files": written},
        "metrics": {f"{key}/images": entry["count"] for key, entry in written.items()},
    }


def _reconstruction(cfg: DictConfig) -> dict:
    started = time.monotonic()
    ckpt_path = cfg.ckpt_path
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    log.info("seed: %s", cfg.seed)
    datamodule = build(cfg.dataset, "dataset")
    ckpt = read_checkpoint(ckpt_path, trusted=cfg.trust_checkpoint)
    hparams = OmegaConf.create(ckpt.get("hyper_parameters") or {})
    module = dvae_module(hparams, at="ckpt_path hyper_parameters")  # the run's own settings
    module.load_state_dict(ckpt["state_dict"], strict=True)
    loggers = build_all(cfg.get("logger"), "logger")
    callbacks = build_all(cfg.get("callbacks"), "callbacks")
    trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
    trainer.test(module, dataloaders=datamodule.split_dataloader(cfg.split))
    metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    summary = collect_metrics(cfg, trainer, {}, metrics, time.monotonic() - started)
    return {
        **summary,
        "split": cfg.split,
        "checkpoints": {"evaluated": str(ckpt_path)},
    }
