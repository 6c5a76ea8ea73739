"""Building objects from the Hydra config, with user errors reported as one `ConfigError`.

Everything a run builds goes through `build`, so a wrong value anywhere in a config group
(`model.net.image_size=50`, an unknown key, a typo in a class path) fails before any work
starts, naming the field as the user types it.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from dalle_lightning.config import (
    ConfigError,
    require,
    require_bool,
    require_choice,
    require_float,
    require_int,
)
from dalle_lightning.modules.fsdp2_options import check_options

log = logging.getLogger(__name__)
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
        detail = " ".join(f"{type(cause).__name__}: {cause}".split()) if cause else str(err)
        raise ConfigError(group, cfg.get("_target_"), f"could not be built: {detail}") from None
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


def check_run(cfg: DictConfig) -> None:
    """The top-level fields of train.yaml and the optimizer, before anything is built."""
    seed = cfg.get("seed")
    require(
        isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32,
        "seed",
        seed,
        "an integer in [0, 2**32)",
    )
    for flag in ("test", "resume", "trust_checkpoint"):
        value = cfg.get(flag, False)
        require_bool(flag, value)
    optimizer = cfg.model.get("optimizer") if cfg.get("model") else None
    if optimizer:
        check_optimizer(optimizer)


def check_optimizer(optimizer: DictConfig) -> None:
    """AdamW's arguments (lr, betas, eps, weight_decay), named `model.optimizer.*`."""
    field = "model.optimizer"
    lr = optimizer.get("lr")
    require_float(f"{field}.lr", lr, 1e-12)
    if "weight_decay" in optimizer:
        require_float(f"{field}.weight_decay", optimizer.weight_decay, 0.0)
    if "eps" in optimizer:
        require_float(f"{field}.eps", optimizer.eps, 0.0)
    if "betas" in optimizer:
        betas = list(optimizer.betas) if hasattr(optimizer.betas, "__len__") else optimizer.betas
        require(
            isinstance(betas, list)
            and len(betas) == 2
            and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas),
            f"{field}.betas",
            betas,
            "two numbers in [0, 1), e.g. [0.9, 0.96]",
        )


def check_monitored(metric: str | None, module: Any) -> None:
    """`optimized_metric` (what checkpoints keep and sweeps optimise) must be logged."""
    known = getattr(type(module), "VALIDATION_METRICS", None)
    if metric is None or known is None:
        return
    require_choice("optimized_metric", metric, known)


def check_trainer(cfg: DictConfig) -> None:
    """The trainer fields a user commonly mistypes, checked before anything is built."""
    t = cfg.trainer
    max_steps = t.get("max_steps", -1)
    require_int("trainer.max_steps", max_steps, -1)
    require(max_steps != 0, "trainer.max_steps", max_steps, "an integer >= 1, or -1 (no limit)")
    anneal = OmegaConf.select(cfg, "model.anneal_fraction", default=0) or 0
    require(
        not anneal or max_steps > 0,
        "model.anneal_fraction",
        anneal,
        "0 when trainer.max_steps is not set (the anneal ends at trainer.max_steps)",
    )
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
    precision = str(t.get("precision", "32-true"))
    require_choice("trainer.precision", precision, PRECISIONS)
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    require(
        not (precision.startswith("16") and on_cpu),
        "trainer.precision",
        precision,
        "bf16-mixed or 32-true on CPU (fp16 autocast and its GradScaler are for GPUs)",
    )
    for key in ("accumulate_grad_batches", "log_every_n_steps"):
        if t.get(key) is not None:
            require_int(f"trainer.{key}", t.get(key), 1)
    if t.get("gradient_clip_val") is not None:
        require_float("trainer.gradient_clip_val", t.gradient_clip_val, 0.0)
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
    strategy = t.get("strategy")
    target = str(strategy.get("_target_", "")) if isinstance(strategy, DictConfig) else ""
    if target.endswith("FSDP2Strategy"):
        _check_fsdp2(strategy, devices, t.get("num_nodes", 1))
        model = str(OmegaConf.select(cfg, "model._target_", default=""))
        require(
            not model.endswith("ClipModule"),
            "trainer",
            "fsdp",
            "ddp for model=clip (trainer=fsdp shards the dVAE and the prior; the CLIP "
            "reranker is small enough to replicate)",
        )
    if target.endswith("FSDPStrategy") or strategy == "fsdp":
        require(
            accelerator in ("gpu", "cuda"),
            "trainer.accelerator",
            accelerator,
            "gpu: Lightning's FSDPStrategy runs on CUDA devices only (on CPU: trainer=fsdp, FSDP2)",
        )
    if isinstance(strategy, DictConfig) and strategy.get("ddp_comm_hook") and accelerator == "cpu":
        log.warning(
            "trainer.strategy.ddp_comm_hook is set, but Lightning registers DDP communication "
            "hooks on CUDA devices only: on CPU the gradients are all-reduced uncompressed"
        )


def _check_fsdp2(strategy: DictConfig, devices: Any, num_nodes: Any) -> None:
    """trainer=fsdp: more than one rank, and a tensor-parallel size the ranks divide into."""
    count = len(devices) if isinstance(devices, list) else devices
    world = count * num_nodes if isinstance(count, int) and count > 0 else None
    require(
        world is None or world > 1,
        "trainer.devices",
        devices,
        "2 or more with trainer=fsdp (it shards over ranks; one device: trainer=cpu or "
        "trainer=gpu)",
    )
    check_options(strategy)
    tp = strategy.get("tensor_parallel_size", 1)
    require_int("trainer.strategy.tensor_parallel_size", tp, 1)
    require(
        world is None or world % tp == 0,
        "trainer.strategy.tensor_parallel_size",
        tp,
        f"a divisor of the {world} ranks (trainer.devices x trainer.num_nodes)",
    )
    require(
        tp == 1,
        "trainer.strategy.tensor_parallel_size",
        tp,
        "1: the models have no tensor-parallel plan yet; FSDP2 shards over all ranks",
    )
