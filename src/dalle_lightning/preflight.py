"""`check_train(cfg)`, `check_evaluate(cfg)`: every check of a train or evaluate config that
needs neither data nor Lightning.

The top-level fields and the optimizer (`instantiate.check_run`), the trainer
(`instantiate.check_trainer`), the checkpoint to resume from (`runs.checkpoint_to_resume`)
and the stage's model group (`stage_settings.py`, with stage 2's dVAE checkpoint);
checkpoints are found, not read. For evaluate.py: the task and its values, the sampling
values given and the checkpoint to evaluate (`ProtocolConfig` for metrics). The scripts run
them before importing Lightning, whose imports take longer than all of this (8 s against 3 s
for torch on a slow 2-core machine), so a mistyped value is refused in seconds;
`train.train` and `evaluate.evaluate` run them again, for callers that skip the scripts. What
needs built objects is checked while they are built (`stages.py`, the evaluate tasks). This
module must not import Lightning: a test runs it in a fresh process and checks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from dalle_lightning.checkpoints import require_file
from dalle_lightning.config import (
    require,
    require_choice,
    require_dataset_root,
    require_int,
    typed,
)
from dalle_lightning.evaluation.protocol import ProtocolConfig
from dalle_lightning.instantiate import check_run, check_trainer
from dalle_lightning.runs import checkpoint_to_resume, latest_checkpoint
from dalle_lightning.sampling.sampler import SamplingConfig, resolve_sampling
from dalle_lightning.stage_settings import stage_settings

TASKS = ("metrics", "generate", "attributes", "reconstruction", "reference_stats")
SPLITS = ("train", "val", "test", "heldout")


def check_train(cfg: DictConfig) -> None:
    check_run(cfg)
    check_trainer(cfg)
    checkpoint_to_resume(cfg)
    stage_settings(cfg)
    dataset_root(cfg)


def check_evaluate(cfg: DictConfig) -> None:
    require_choice("task", cfg.task, TASKS)
    check_run(cfg)  # seed, trust_checkpoint
    if cfg.task == "generate":
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
    if cfg.task == "attributes":
        require_int("num_captions", cfg.num_captions, 1)
    if cfg.task in ("metrics", "reference_stats"):
        protocol_config(cfg)
    if cfg.task in ("generate", "attributes", "metrics"):
        sampling_request(cfg)
        prior_checkpoint(cfg)
    if cfg.task != "generate":  # every other task reads the dataset
        dataset_root(cfg)
    if cfg.task == "reconstruction":
        require_choice("split", cfg.split, SPLITS)
        require_file(
            cfg.get("ckpt_path"),
            "ckpt_path",
            "an existing checkpoint, e.g. logs/train_dvae/runs/<timestamp>/checkpoints/last.ckpt",
        )
        check_trainer(cfg)


def dataset_root(cfg: DictConfig) -> None:
    """The folder of a dataset read from disk (coco, cub, folder: `dataset.root`) exists. Its
    datamodule checks the same when it is built, after Lightning's import and the checkpoint's
    load (~10 s on a 2-core CPU); here a missing or mistyped path fails in the first seconds."""
    if cfg.dataset.get("root") is not None:
        require_dataset_root(cfg.dataset.root)


def protocol_config(cfg: DictConfig) -> ProtocolConfig:
    names = [f.name for f in dataclasses.fields(ProtocolConfig)]
    return typed(ProtocolConfig, {k: cfg.get(k) for k in names if k in cfg}, "")


def sampling_request(cfg: DictConfig) -> tuple[dict, int]:
    """The sampling values `cfg.sampling` sets (checked; null: the checkpoint's own) and the
    sampling batch size."""
    given = {k: v for k, v in cfg.sampling.items() if k != "batch_size"}
    batch_size = cfg.sampling.batch_size
    require_int("sampling.batch_size", batch_size, 1)
    resolve_sampling(given, SamplingConfig(), guidance_trained=True)  # checks the given values
    return given, batch_size


def prior_checkpoint(cfg: DictConfig) -> str:
    """`ckpt_path`, or the best checkpoint of the newest finished train_dalle run; a file."""
    ckpt_path = cfg.get("ckpt_path") or latest_checkpoint(cfg.paths.log_dir, "train_dalle")
    require(
        ckpt_path is not None,
        "ckpt_path",
        None,
        f"a stage-2 checkpoint (none found under {Path(cfg.paths.log_dir) / 'train_dalle'}: "
        "run `python train.py model=dalle` first, or pass ckpt_path=PATH)",
    )
    require_file(ckpt_path, "ckpt_path", "an existing stage-2 checkpoint file")
    return str(ckpt_path)
