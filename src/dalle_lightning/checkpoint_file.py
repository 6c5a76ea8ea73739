"""Reading a checkpoint file safely: tensors only unless the user says the file is trusted.

Every checkpoint this project reads goes through `read_checkpoint`, which loads with
`torch.load(weights_only=True)`: tensors, numbers, strings and containers, never arbitrary
Python objects (unpickling those can run code). A file that needs more is refused with a line
that names it and the flag that allows it (`trust_checkpoint=true`: only for files you trust).
A truncated or corrupt file is reported with its path, never half-loaded.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from dalle_lightning.config import ConfigError


def read_checkpoint(
    path: str | Path,
    field: str = "ckpt_path",
    trusted: bool = False,
    mmap: bool = False,
    map_location: str | torch.device = "cpu",
) -> dict:
    """The checkpoint at `path` as a dict; user errors as a `ConfigError` on `field`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(field, str(path), "an existing checkpoint file")
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
