"""Checkpoint files: reading them safely, hashing them, and what each stage's file holds.

Every checkpoint this project reads goes through `read_checkpoint`, which loads with
`torch.load(weights_only=True)`: tensors, numbers, strings and containers, never arbitrary
Python objects (unpickling those can run code). A file that needs more is refused with a line
that names it and the flag that allows it (`trust_checkpoint=true`: only for files you trust).
A truncated or corrupt file is reported with its path, never half-loaded.

The formats, all Lightning checkpoints (`state_dict` keys prefixed with the LightningModule's
attribute that holds the network) plus entries our modules add in `on_save_checkpoint`:
- dVAE (`train.py model=dvae`): `net.` weights and `dvae_config`. The exported form
  (`export_dvae`, `convert_openai.py`) is `{"dvae_config", "state_dict"}` without a prefix.
- prior (`model=dalle`): `model.` weights (`model.prior.*`, `model.dvae.*`), `prior_config`,
  `dvae_config`, `tokenizer`, `sampling`, `caption_dropout` (and `lr_plateau`, the module's
  own state). Files written before `sampling` and `caption_dropout` were entries hold them in
  `hyper_parameters`.
- CLIP (`model=clip`): `net.` weights, `clip_config`, `tokenizer`, `data_identity`.
This module is the only place that knows these names; models rebuild themselves from the
plain parts it returns.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch

from dalle_lightning.config import ConfigError

DVAE_WEIGHTS = "net."  # DVAEModule.net
PRIOR_WEIGHTS = "model."  # DalleModule.model (a DALLE: .prior, .dvae)
CLIP_WEIGHTS = "net."  # ClipModule.net


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes: what names a checkpoint in caches and records."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(
    path: str | Path,
    field: str = "ckpt_path",
    trusted: bool = False,
    mmap: bool = False,
    map_location: str | torch.device = "cpu",
) -> dict:
    """The checkpoint at `path` as a dict; user errors as a `ConfigError` on `field`."""
    path = Path(path)
    require_file(path, field, "an existing checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=not trusted, mmap=mmap)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if trusted or refused is None:  # garbage bytes, not a refused object
            raise _corrupt(field, path, err) from None
        raise ConfigError(
            field,
            str(path),
            "a checkpoint of tensors and plain values: this one holds a Python object "
            f"({refused.group(1)}) that torch.load(weights_only=True) refuses, and loading it "
            "runs code from the file; if you trust the file, pass trust_checkpoint=true",
        ) from None
    except Exception as err:  # truncated zip, not a torch file, ...
        raise _corrupt(field, path, err) from None
    if not isinstance(ckpt, dict):
        raise ConfigError(field, str(path), f"a checkpoint dict, not a {type(ckpt).__name__}")
    return ckpt


# sharded checkpoints (trainer=fsdp) ---------------------------------------------------------------
SHARDED_META = "meta.pt"  # Lightning's file of everything but weights and optimizer state


def is_sharded(path: str | Path) -> bool:
    """Whether `path` is a torch.distributed.checkpoint directory written under FSDP2."""
    path = Path(path)
    return path.is_dir() and (path / SHARDED_META).is_file() and (path / ".metadata").is_file()


def require_file(path: str | Path | None, field: str, expected: str) -> None:
    """A checkpoint file at `path`, else a ConfigError on `field` saying `expected`; a sharded
    directory gets the command that makes one file of it."""
    if path is not None and is_sharded(path):
        raise ConfigError(
            field,
            str(path),
            "a single checkpoint file: this is a sharded checkpoint directory (trainer=fsdp); "
            f"consolidate it first: python -m dalle_lightning.consolidate {path}",
        )
    if path is None or not Path(path).is_file():
        raise ConfigError(field, None if path is None else str(path), expected)


def checkpoint_exists(path: str | Path) -> bool:
    """A checkpoint file, or a sharded checkpoint directory."""
    return Path(path).is_file() or is_sharded(path)


def read_sharded_meta(path: str | Path, field: str = "ckpt_path") -> dict:
    """Lightning's entries of a sharded checkpoint (step, loops, callbacks, ours), no weights."""
    return read_checkpoint(Path(path) / SHARDED_META, field)


def consolidate(path: str | Path, out: str | Path) -> dict:
    """One file from a sharded checkpoint directory: its metadata plus the full `state_dict`
    (all shards gathered on this process, no process group needed); written atomically to
    `out`. The optimizer state is left out: resume from the directory itself."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    meta = read_sharded_meta(path)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    try:
        dcp_to_torch_save(path, tmp)  # every shard, whole, on this process (no process group)
        state = torch.load(tmp, map_location="cpu", weights_only=True)
        if "state_dict" not in state:
            raise ConfigError("path", str(path), "a checkpoint with a state_dict: none was saved")
        ckpt = {**meta, "state_dict": state["state_dict"], "consolidated_from": str(path)}
        torch.save(ckpt, tmp)
        tmp.replace(out)
    finally:  # a failed write (a full disk) leaves no partial file
        tmp.unlink(missing_ok=True)
    return ckpt


def _corrupt(field: str, path: Path, err: Exception) -> ConfigError:
    if isinstance(err, pickle.UnpicklingError):
        detail = "its bytes do not unpickle"
    else:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return ConfigError(
        field,
        str(path),
        f"a readable checkpoint: the file is truncated or corrupt ({detail}); use another one "
        "(e.g. checkpoints/best-*.ckpt of the same run) or retrain",
    )


def _weights(state_dict: dict, prefix: str) -> dict:
    """The entries of `state_dict` under `prefix`, without it."""
    return {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}


# dVAE -----------------------------------------------------------------------------------------
class DVAEFile(NamedTuple):
    config: dict  # DVAEConfig's fields
    state_dict: dict  # DVAE's own keys


def dvae_entries(config: dict) -> dict:
    """What a dVAE training checkpoint carries besides Lightning's entries."""
    return {"dvae_config": config}


def export_dvae(dvae: Any) -> dict:
    """A dVAE (anything with a dataclass `config` and a `state_dict`) as the minimal,
    weights_only-loadable file `read_dvae` reads: `torch.save(export_dvae(dvae), path)`."""
    return {**dvae_entries(asdict(dvae.config)), "state_dict": dvae.state_dict()}


def read_dvae(
    path: str | Path, field: str = "ckpt_path", map_location: str | torch.device = "cpu"
) -> DVAEFile:
    """A dVAE training checkpoint or an exported file, as its config and plain weights."""
    ckpt = read_checkpoint(path, field, map_location=map_location)
    if "dvae_config" not in ckpt or "state_dict" not in ckpt:
        raise ConfigError(
            field,
            str(path),
            "a dVAE checkpoint (this file has no 'dvae_config'/'state_dict'): train one with "
            "`python train.py model=dvae` or convert the official weights with "
            "`python -m dalle_lightning.models.convert_openai`",
        )
    state = ckpt["state_dict"]
    if any(k.startswith(DVAE_WEIGHTS) for k in state):  # a LightningModule's checkpoint
        state = _weights(state, DVAE_WEIGHTS)
    return DVAEFile(ckpt["dvae_config"], state)


# prior (stage 2) --------------------------------------------------------------------------------
class DalleFile(NamedTuple):
    prior_config: dict  # PriorConfig's fields
    dvae_config: dict  # DVAEConfig's fields
    tokenizer: dict  # BPETokenizer.state()
    sampling: dict | None  # SamplingConfig's fields: what it was trained for
    caption_dropout: float  # share of blank training captions (> 0: guidance works)
    state_dict: dict  # DALLE's own keys (prior.*, dvae.*)


def dalle_entries(
    prior_config: dict,
    dvae_config: dict,
    tokenizer: dict | None,
    sampling: dict,
    caption_dropout: float,
) -> dict:
    """What a stage-2 training checkpoint carries besides Lightning's entries."""
    return {
        "prior_config": prior_config,
        "dvae_config": dvae_config,
        "tokenizer": tokenizer,
        "sampling": sampling,
        "caption_dropout": caption_dropout,
    }


def read_dalle(
    path: str | Path,
    field: str = "ckpt_path",
    trusted: bool = False,
    map_location: str | torch.device = "cpu",
) -> DalleFile:
    ckpt = read_checkpoint(path, field, trusted, map_location=map_location)
    missing = [k for k in ("prior_config", "dvae_config", "tokenizer") if not ckpt.get(k)]
    if missing or "state_dict" not in ckpt:
        raise ConfigError(
            field,
            str(path),
            f"a stage-2 checkpoint (this file has no {', '.join(missing) or 'state_dict'}): "
            "train one with `python train.py model=dalle`",
        )
    hparams = ckpt.get("hyper_parameters") or {}  # files written before the entries existed
    return DalleFile(
        ckpt["prior_config"],
        ckpt["dvae_config"],
        ckpt["tokenizer"],
        ckpt.get("sampling", hparams.get("sampling")),
        ckpt.get("caption_dropout", hparams.get("caption_dropout", 0.0)),
        _weights(ckpt["state_dict"], PRIOR_WEIGHTS),
    )


# CLIP reranker --------------------------------------------------------------------------------
class ClipFile(NamedTuple):
    config: dict  # ClipConfig's fields
    tokenizer: dict  # BPETokenizer.state()
    data_identity: dict | None  # the dataset it was trained on
    state_dict: dict  # ContrastiveModel's own keys


def clip_entries(config: dict, tokenizer: dict, data_identity: dict | None) -> dict:
    """What a CLIP training checkpoint carries besides Lightning's entries."""
    return {"clip_config": config, "tokenizer": tokenizer, "data_identity": data_identity}


def read_clip(path: str | Path, field: str = "reranker.ckpt_path") -> ClipFile:
    ckpt = read_checkpoint(path, field)
    if not ckpt.get("clip_config") or not ckpt.get("tokenizer") or "state_dict" not in ckpt:
        raise ConfigError(field, str(path), "a checkpoint of `python train.py model=clip`")
    state = _weights(ckpt["state_dict"], CLIP_WEIGHTS)
    return ClipFile(ckpt["clip_config"], ckpt["tokenizer"], ckpt.get("data_identity"), state)
