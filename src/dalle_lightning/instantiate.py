"""Building objects from the Hydra config, with user errors reported as one `ConfigError`.

Everything a run builds goes through `build`, so a wrong value anywhere in a config group
(`model.net.image_size=50`, an unknown key, a typo in a class path) fails before any work
starts, naming the field as the user types it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from dalle_lightning.config import ConfigError, require, require_choice, require_int

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")


def build(cfg: DictConfig, group: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate(cfg), with errors named under the config group `group`."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise _under(cause, group) from None
        if isinstance(cause, TypeError) and "argument" in str(cause):  # unknown/missing key
            raise ConfigError(
                group, cfg.get("_target_"), f"valid arguments only: {cause}"
            ) from None
        raise ConfigError(group, cfg.get("_target_"), f"could not be built: {err}") from None
    except ConfigError as err:
        raise _under(err, group) from None


def build_all(cfg: DictConfig | None, group: str) -> list[Any]:
    """Instantiate every entry of a group of named objects (callbacks, loggers)."""
    if not cfg:
        return []
    return [build(sub, f"{group}.{name}") for name, sub in cfg.items() if "_target_" in sub]


def _under(err: ConfigError, group: str) -> ConfigError:
    root = group.split(".")[0]
    return err if err.field.split(".")[0] == root else err.at(group)


def check_trainer(cfg: DictConfig) -> None:
    """The trainer fields a user commonly mistypes, checked before anything is built."""
    t = cfg.trainer
    max_steps = t.get("max_steps", -1)
    require_int("trainer.max_steps", max_steps, -1)
    require(max_steps != 0, "trainer.max_steps", max_steps, "an integer >= 1, or -1 (no limit)")
    max_epochs = t.get("max_epochs")
    if max_epochs is not None:
        require_int("trainer.max_epochs", max_epochs, -1)
    require(
        max_steps > 0 or (max_epochs is not None and max_epochs > 0) or t.get("fast_dev_run"),
        "trainer.max_steps",
        max_steps,
        "an integer >= 1 when trainer.max_epochs is not set (training would never end)",
    )
    accelerator = t.get("accelerator", "auto")
    require_choice("trainer.accelerator", accelerator, ACCELERATORS)
    if accelerator in ("gpu", "cuda"):
        require(
            torch.cuda.is_available(),
            "trainer.accelerator",
            accelerator,
            "cpu or auto on this machine (no CUDA GPU is visible); e.g. trainer=cpu",
        )
    require_choice("trainer.precision", str(t.get("precision", "32-true")), PRECISIONS)
    devices = t.get("devices", "auto")
    require(
        devices == "auto"
        or (isinstance(devices, int) and (devices >= 1 or devices == -1))
        or isinstance(devices, (list, str)),
        "trainer.devices",
        devices,
        "an integer >= 1, -1 (all), 'auto' or a list of device ids",
    )
    vci = t.get("val_check_interval", 1.0)
    require(
        vci is None
        or (isinstance(vci, int) and vci >= 1)
        or (isinstance(vci, float) and 0 < vci <= 1),
        "trainer.val_check_interval",
        vci,
        "an integer number of steps >= 1 or a fraction of an epoch in (0, 1]",
    )


def check_ckpt_path(ckpt_path: str | None, field: str = "ckpt_path") -> None:
    if ckpt_path is not None and ckpt_path not in ("last", "best"):
        require(Path(ckpt_path).is_file(), field, ckpt_path, "an existing checkpoint file")
