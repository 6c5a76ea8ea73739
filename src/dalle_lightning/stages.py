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

A stage first turns its config group into typed configs (`config.typed`): the flat keys of
conf/model/<stage>.yaml are the fields of the stage's loss and schedule dataclasses plus a
few module options, nested nodes (`net`, `text`, `sampling`) are dataclasses of their own.
So a bad value fails before any data is read or any checkpoint is loaded.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import hydra
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from omegaconf import DictConfig, OmegaConf

from dalle_lightning.checkpoints import file_sha256, require_file
from dalle_lightning.config import (
    ConfigError,
    require,
    require_bool,
    require_int,
    typed,
)
from dalle_lightning.data.token_cache import load_or_train_tokenizer
from dalle_lightning.data.token_datamodule import TokenDataModule
from dalle_lightning.instantiate import build
from dalle_lightning.models.clip import ClipConfig
from dalle_lightning.models.dvae import DVAE, DVAEConfig
from dalle_lightning.models.transformer import PriorConfig
from dalle_lightning.modules.clip_module import ClipModule
from dalle_lightning.modules.dalle_module import DalleModule
from dalle_lightning.modules.dvae_module import DVAEModule
from dalle_lightning.modules.losses import DVAELoss, PriorLoss
from dalle_lightning.modules.schedules import ClipSchedule, DVAESchedule, PriorSchedule
from dalle_lightning.runs import latest_checkpoint
from dalle_lightning.sampling.sampler import SamplingConfig, resolve_sampling
from dalle_lightning.text.tokenizer import TextConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
HYDRA_KEYS = ("_target_", "_convert_", "_recursive_", "_partial_")


class Stage(NamedTuple):
    datamodule: LightningDataModule
    module: LightningModule
    inputs: dict  # the artefacts it was built from, for metrics.json (stage 2: the dVAE)


def build_stage(cfg: DictConfig) -> Stage:
    """The datamodule and LightningModule of the stage `model._target_` names."""
    builders = {DVAEModule: dvae_stage, DalleModule: prior_stage, ClipModule: clip_stage}
    target = cfg.model.get("_target_")
    names = ", ".join(f"{c.__module__}.{c.__name__}" for c in builders)
    try:
        module_class = hydra.utils.get_class(str(target))
    except Exception:  # Hydra wraps import errors in several types
        module_class = None
    require(module_class in builders, "model._target_", target, f"one of {names}")
    return builders[module_class](cfg)


# stage 1 --------------------------------------------------------------------------------------
def dvae_stage(cfg: DictConfig) -> Stage:
    module = dvae_module(cfg.model, optimizer=_optimizer(cfg.model))
    datamodule = build(cfg.dataset, "dataset")
    datamodule.setup("fit")  # reads the data now: bad files are counted, too many stop here
    return Stage(datamodule, module, {})


def dvae_module(group: Mapping, at: str = "model", optimizer=None) -> DVAEModule:
    """conf/model/dvae.yaml, or the `hyper_parameters` of a dVAE checkpoint (the same
    layout), as a `DVAEModule`."""
    node = _plain(group)
    node.pop("optimizer", None)
    net = typed(DVAEConfig, node.pop("net", None), f"{at}.net")
    loss, schedule = _take(node, DVAELoss, at), _take(node, DVAESchedule, at)
    kinds = dict(num_logged_images=int, channels_last=bool, compile=bool)
    options = _options(node, at, **kinds)
    _no_more(node, at, "net", DVAELoss, DVAESchedule, *kinds, "optimizer")
    return DVAEModule(net, loss, schedule, optimizer, **options)


# stage 2 --------------------------------------------------------------------------------------
def prior_stage(cfg: DictConfig) -> Stage:
    at = "model"
    node = _plain(cfg.model)
    node.pop("optimizer", None)
    dvae_ckpt, net = node.pop("dvae_ckpt", None), node.pop("net", None) or {}
    text = typed(TextConfig, node.pop("text", None), f"{at}.text")
    sampling = typed(SamplingConfig, node.pop("sampling", None), f"{at}.sampling")
    loss, schedule = _take(node, PriorLoss, at), _take(node, PriorSchedule, at)
    kinds = dict(num_sample_captions=int, compile=bool)
    options = _options(node, at, **kinds)
    known = ("dvae_ckpt", "net", "text", "sampling", PriorLoss, PriorSchedule, *kinds)
    _no_more(node, at, *known, "optimizer")
    # guidance needs blank captions in training: refused here, not after an hour of it
    resolve_sampling({}, sampling, loss.caption_dropout > 0, at=f"{at}.sampling")
    if net.get("backend") == "flex" and not torch.cuda.is_available():
        cpu = "sdpa on CPU (FlexAttention has no CPU backward)"
        raise ConfigError(f"{at}.net.backend", "flex", cpu)

    dvae_path = resolve_dvae_ckpt(dvae_ckpt, cfg.paths.log_dir)
    dvae = DVAE.from_checkpoint(dvae_path, field=f"{at}.dvae_ckpt")
    prior = typed(
        PriorConfig,
        net,
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
    sha256 = file_sha256(dvae_path)
    datamodule = TokenDataModule(images, dvae, sha256, cfg.paths.cache_dir, text)
    module = DalleModule(
        prior, dvae, None, loss, schedule, sampling, _optimizer(cfg.model), **options
    )
    return Stage(datamodule, module, {"dvae_ckpt": str(dvae_path), "dvae_sha256": sha256})


def resolve_dvae_ckpt(dvae_ckpt: str | None, log_dir: str) -> Path:
    """`model.dvae_ckpt`, or the best checkpoint of the newest finished dVAE run."""
    if dvae_ckpt is not None:
        require_file(dvae_ckpt, "model.dvae_ckpt", "an existing dVAE checkpoint")
        return Path(dvae_ckpt)
    found = latest_checkpoint(log_dir, "train_dvae")
    require(
        found is not None,
        "model.dvae_ckpt",
        None,
        f"a dVAE checkpoint, and no finished dVAE run is under {log_dir}/train_dvae: "
        "run `python train.py model=dvae` first, or pass model.dvae_ckpt=PATH",
    )
    log.info("dVAE: %s (the newest finished run; set model.dvae_ckpt=PATH to choose)", found)
    return found


# the in-project CLIP ----------------------------------------------------------------------------
def clip_stage(cfg: DictConfig) -> Stage:
    at = "model"
    node = _plain(cfg.model)
    node.pop("optimizer", None)
    vocab_size = node.pop("vocab_size", 512)
    require_int(f"{at}.vocab_size", vocab_size, 2)
    net = typed(ClipConfig, node.pop("net", None), f"{at}.net", text_vocab=vocab_size)
    schedule = _take(node, ClipSchedule, at)
    _no_more(node, at, ClipSchedule, "net", "vocab_size", "optimizer")
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


# config groups as typed configs -----------------------------------------------------------------
def _plain(group: Mapping) -> dict:
    """A config group (or a checkpoint's hyper_parameters) as a dict without Hydra's keys."""
    node = OmegaConf.to_container(group, resolve=True) if isinstance(group, DictConfig) else group
    return {k: v for k, v in dict(node).items() if k not in HYDRA_KEYS}


def _take(node: dict, cls: type[T], at: str) -> T:
    """The keys of `node` that are fields of the dataclass `cls`, removed from it, as a `cls`."""
    names = _field_names(cls)
    return typed(cls, {k: node.pop(k) for k in list(node) if k in names}, at)


def _options(node: dict, at: str, **kinds: type) -> dict[str, Any]:
    """Plain module options (an integer >= 0 or true/false) that `node` sets."""
    options = {}
    for name, kind in kinds.items():
        if name in node:
            value = options[name] = node.pop(name)
            if kind is bool:
                require_bool(f"{at}.{name}", value)
            else:
                require_int(f"{at}.{name}", value, 0)
    return options


def _no_more(node: dict, at: str, *known: type | str) -> None:
    """Fail on a key left over after the stage took its fields: not a field of anything."""
    if not node:
        return
    names = [n for k in known for n in ([k] if isinstance(k, str) else _field_names(k))]
    key = next(iter(node))
    raise ConfigError(f"{at}.{key}", node[key], "not a field; " + at + " has " + ", ".join(names))


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _optimizer(group: Mapping):
    """The half-built optimizer of a model group (`_partial_: true`), or None."""
    if isinstance(group, DictConfig) and group.get("optimizer") is not None:
        return build(group.optimizer, "model.optimizer")
    return None
