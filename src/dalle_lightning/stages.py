"""Assembling a training stage from the composed config: its artefacts, its data, its module.

`build_stage(cfg)` is what `train.train` calls after seeding; one builder per stage, picked
by the class that `model._target_` names:

- `dvae_stage` (stage 1): the image datamodule and a `DVAEModule`.
- `prior_stage` (stage 2): the dVAE checkpoint (`model.dvae_ckpt`, or the newest finished
  dVAE run) loaded once into a frozen `DVAE`, with its sha256; the token cache over the
  image datamodule (`TokenDataModule`); a `DalleModule` handed that dVAE and typed configs.
- `clip_stage` (the in-project reranker): the dataset's BPE tokenizer, loaded from the token
  cache or learned from the training captions (the file the dataset's prior uses too), and a
  `ClipModule` handed it.

A stage first reads its config group as typed configs (`stage_settings.py`, which train.py
has already run before importing Lightning), so a bad value fails before any data is read or
any checkpoint is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import NamedTuple

import hydra
from lightning.pytorch import LightningDataModule, LightningModule
from omegaconf import DictConfig

from dalle_lightning.checkpoints import file_sha256
from dalle_lightning.config import require, typed
from dalle_lightning.data.token_cache import load_or_train_tokenizer
from dalle_lightning.data.token_datamodule import TokenDataModule
from dalle_lightning.instantiate import build
from dalle_lightning.models.dvae import DVAE
from dalle_lightning.models.transformer import PriorConfig
from dalle_lightning.modules.clip_module import ClipModule
from dalle_lightning.modules.dalle_module import DalleModule
from dalle_lightning.modules.dvae_module import DVAEModule
from dalle_lightning.stage_settings import (
    CLIP_MODULE,
    DALLE_MODULE,
    DVAE_MODULE,
    clip_settings,
    dvae_settings,
    prior_settings,
)

log = logging.getLogger(__name__)


class Stage(NamedTuple):
    datamodule: LightningDataModule
    module: LightningModule
    inputs: dict  # the artefacts it was built from, for metrics.json (stage 2: the dVAE)


def build_stage(cfg: DictConfig) -> Stage:
    """The datamodule and LightningModule of the stage `model._target_` names."""
    builders = {DVAE_MODULE: dvae_stage, DALLE_MODULE: prior_stage, CLIP_MODULE: clip_stage}
    target = cfg.model.get("_target_")
    try:  # the class's own name: the one stage_settings (the checks before Lightning) matches
        module_class = hydra.utils.get_class(str(target))
        name = f"{module_class.__module__}.{module_class.__qualname__}"
    except Exception:  # Hydra wraps import errors in several types
        name = None
    require(name in builders, "model._target_", target, f"one of {', '.join(builders)}")
    return builders[name](cfg)


# stage 1 --------------------------------------------------------------------------------------
def dvae_stage(cfg: DictConfig) -> Stage:
    module = dvae_module(cfg.model, optimizer=_optimizer(cfg.model))
    datamodule = build(cfg.dataset, "dataset")
    datamodule.setup("fit")  # reads the data now: bad files are counted, too many stop here
    return Stage(datamodule, module, {})


def dvae_module(group: Mapping, at: str = "model", optimizer=None) -> DVAEModule:
    """conf/model/dvae.yaml, or the `hyper_parameters` of a dVAE checkpoint (the same
    layout), as a `DVAEModule`."""
    net, loss, schedule, options = dvae_settings(group, at)
    return DVAEModule(net, loss, schedule, optimizer, **options)


# stage 2 --------------------------------------------------------------------------------------
def prior_stage(cfg: DictConfig) -> Stage:
    at = "model"
    found = prior_settings(cfg.model, cfg.paths.log_dir, at)
    if cfg.model.get("dvae_ckpt") is None:
        newest = "the newest finished run; set model.dvae_ckpt=PATH to choose"
        log.info("dVAE: %s (%s)", found.dvae_ckpt, newest)
    dvae = DVAE.from_checkpoint(found.dvae_ckpt, field=f"{at}.dvae_ckpt")
    text = found.text
    prior = typed(
        PriorConfig,
        found.net,
        f"{at}.net",
        text_vocab=text.vocab_size,
        text_seq_len=text.text_seq_len,
        image_vocab=dvae.vocab_size,
        grid_size=dvae.grid_size,
    )
    images = build(cfg.dataset, "dataset")
    images.setup("fit")
    size, trained_at = images.identity().get("image_size"), dvae.config.image_size
    require(
        size in (None, trained_at),
        "dataset.image_size",
        size,
        f"{trained_at}, the size the dVAE was trained at (its grid is the prior's)",
    )
    sha256 = file_sha256(found.dvae_ckpt)
    datamodule = TokenDataModule(images, dvae, sha256, cfg.paths.cache_dir, text)
    module = DalleModule(
        prior,
        dvae,
        None,
        found.loss,
        found.schedule,
        found.sampling,
        _optimizer(cfg.model),
        **found.options,
    )
    inputs = {"dvae_ckpt": str(found.dvae_ckpt), "dvae_sha256": sha256}
    return Stage(datamodule, module, inputs)


# the in-project CLIP ----------------------------------------------------------------------------
def clip_stage(cfg: DictConfig) -> Stage:
    vocab_size, net, schedule = clip_settings(cfg.model)
    images = build(cfg.dataset, "dataset")
    images.setup("fit")
    datasets = getattr(images, "datasets", {})
    require(
        "train" in datasets and hasattr(datasets["train"], "captions_of"),
        "dataset",
        cfg.dataset.get("_target_"),
        "an image-caption dataset on disk or built in (shapes, coco, cub, folder)",
    )
    train = datasets["train"]
    captions = [c for i in range(len(train)) for c in train.captions_of(i)]
    tokenizer = load_or_train_tokenizer(
        captions, images.identity(), vocab_size, net.text_seq_len, cfg.paths.cache_dir
    )
    module = ClipModule(net, tokenizer, schedule, _optimizer(cfg.model), images.identity())
    return Stage(images, module, {})


# the optimizer ----------------------------------------------------------------------------------
def _optimizer(group: Mapping):
    """The half-built optimizer of a model group (`_partial_: true`), or None."""
    if isinstance(group, DictConfig) and group.get("optimizer") is not None:
        return build(group.optimizer, "model.optimizer")
    return None
