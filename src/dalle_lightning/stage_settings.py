"""A training stage's settings: its model group (conf/model/<stage>.yaml) as typed configs.

The flat keys of a model group are the fields of the stage's loss and schedule dataclasses
plus a few module options; its nested nodes (`net`, `text`, `sampling`) are dataclasses of
their own (`config.typed`). Reading them needs neither data nor Lightning, so train.py does it
before importing Lightning (`preflight.py`) and `stages.py` again when it builds the stage:
an unknown key, a value of the wrong type or out of range fails in seconds, before anything
is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf

from dalle_lightning.checkpoints import require_file
from dalle_lightning.config import ConfigError, require, require_bool, require_int, typed
from dalle_lightning.models.clip import ClipConfig
from dalle_lightning.models.dvae import DVAEConfig
from dalle_lightning.modules.losses import DVAELoss, PriorLoss
from dalle_lightning.modules.schedules import ClipSchedule, DVAESchedule, PriorSchedule
from dalle_lightning.runs import latest_checkpoint
from dalle_lightning.sampling.sampler import SamplingConfig, resolve_sampling
from dalle_lightning.text.tokenizer import TextConfig

T = TypeVar("T")
HYDRA_KEYS = ("_target_", "_convert_", "_recursive_", "_partial_")
MODULES = "dalle_lightning.modules."
DVAE_MODULE = MODULES + "dvae_module.DVAEModule"
DALLE_MODULE = MODULES + "dalle_module.DalleModule"
CLIP_MODULE = MODULES + "clip_module.ClipModule"


class DVAESettings(NamedTuple):
    net: DVAEConfig
    loss: DVAELoss
    schedule: DVAESchedule
    options: dict[str, Any]  # DVAEModule's keyword options


class PriorSettings(NamedTuple):
    dvae_ckpt: Path  # model.dvae_ckpt, or the best checkpoint of the newest finished dVAE run
    net: dict  # typed as a PriorConfig once the dVAE's codes and grid are read from it
    text: TextConfig
    sampling: SamplingConfig
    loss: PriorLoss
    schedule: PriorSchedule
    options: dict[str, Any]  # DalleModule's keyword options


class ClipSettings(NamedTuple):
    vocab_size: int
    net: ClipConfig
    schedule: ClipSchedule


def dvae_settings(group: Mapping, at: str = "model") -> DVAESettings:
    """conf/model/dvae.yaml, or the `hyper_parameters` of a dVAE checkpoint (the same
    layout)."""
    node = _plain(group)
    node.pop("optimizer", None)
    net = typed(DVAEConfig, node.pop("net", None), f"{at}.net")
    loss, schedule = _take(node, DVAELoss, at), _take(node, DVAESchedule, at)
    kinds = dict(num_logged_images=int, channels_last=bool, compile=bool)
    options = _options(node, at, **kinds)
    _no_more(node, at, "net", DVAELoss, DVAESchedule, *kinds, "optimizer")
    return DVAESettings(net, loss, schedule, options)


def prior_settings(group: Mapping, log_dir: str, at: str = "model") -> PriorSettings:
    """conf/model/dalle.yaml; the dVAE checkpoint is found, not read."""
    node = _plain(group)
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
    path = resolve_dvae_ckpt(dvae_ckpt, log_dir)
    return PriorSettings(path, net, text, sampling, loss, schedule, options)


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
    return found


def clip_settings(group: Mapping, at: str = "model") -> ClipSettings:
    """conf/model/clip.yaml (the in-project reranker)."""
    node = _plain(group)
    node.pop("optimizer", None)
    vocab_size = node.pop("vocab_size", 512)
    require_int(f"{at}.vocab_size", vocab_size, 2)
    net = typed(ClipConfig, node.pop("net", None), f"{at}.net", text_vocab=vocab_size)
    schedule = _take(node, ClipSchedule, at)
    _no_more(node, at, ClipSchedule, "net", "vocab_size", "optimizer")
    return ClipSettings(vocab_size, net, schedule)


def stage_settings(cfg: DictConfig) -> DVAESettings | PriorSettings | ClipSettings | None:
    """The settings of the stage `model._target_` names; None for a target that is not one of
    the three modules by name (`stages.build_stage` then imports it and refuses it)."""
    target = OmegaConf.select(cfg, "model._target_", default=None)
    if target == DVAE_MODULE:
        return dvae_settings(cfg.model)
    if target == DALLE_MODULE:
        return prior_settings(cfg.model, cfg.paths.log_dir)
    if target == CLIP_MODULE:
        return clip_settings(cfg.model)
    return None


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
