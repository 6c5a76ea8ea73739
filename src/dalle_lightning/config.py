"""Typed configs and their one error type.

Every component's settings are a frozen dataclass next to the code it configures
(`DVAEConfig`, `PriorConfig`, `TextConfig`, `SamplingConfig`, `DVAELoss`, `PriorSchedule`,
`ProtocolConfig`, ...), mirrored by a yaml node in conf/. `typed` turns the node into the
dataclass once, at the edge (`stages.py`, `evaluate.py`), through OmegaConf's structured
configs: an unknown key or a value of the wrong type fails there, and the ranges that
`__post_init__` checks fail there too. Deeper code receives the dataclasses and trusts them.

A user error in a config value is a `ConfigError` whose message is one line naming the field
as the user types it (`model.net.dim`), the value and what is allowed; the entry scripts print
that line and exit with code 2.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value a user can fix. `field` is the dotted path as the user types it."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r} is invalid: {allowed}")

    def at(self, prefix: str) -> ConfigError:
        """The same error with the field placed under `prefix` (e.g. 'model.net')."""
        return ConfigError(_under(prefix, self.field), self.value, self.allowed)


def _under(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def typed(cls: type[T], node: Mapping | DictConfig | T | None, at: str, **derived: Any) -> T:
    """`node` (a yaml mapping; None: all defaults) as the dataclass `cls`, validated.

    `derived` are fields the code computes (sizes read from a checkpoint, say); the yaml may
    not set them. Errors name the field under `at` (top-level keys: `at=""`):
    `typed(PriorConfig, cfg.model.net, "model.net")` reports `model.net.dim`.
    """
    if isinstance(node, cls):
        return node
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    given = dict(node or {})
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key, value in given.items():
        if key in derived:
            note = getattr(cls, "DERIVED", "computed by the code")
            raise ConfigError(_under(at, key), value, f"not set in the config: {note}")
        if key not in names:
            settable = ", ".join(n for n in names if n not in derived)
            raise ConfigError(_under(at, key), value, f"not a field; {at or 'it'} has {settable}")
    schema = OmegaConf.structured(cls)
    try:
        merged = OmegaConf.merge(schema, {**given, **derived})
    except OmegaConfBaseException:  # a value of the wrong type: find which, name it
        hints = typing.get_type_hints(cls)
        for key, value in given.items():
            try:
                OmegaConf.merge(schema, {key: value})
            except OmegaConfBaseException:
                raise ConfigError(_under(at, key), value, describe(hints[key])) from None
        raise
    try:
        return OmegaConf.to_object(merged)  # runs __post_init__: the ranges
    except ConfigError as err:
        raise err.at(at) from None


def describe(hint: Any) -> str:
    """What a value of type `hint` looks like, for an error message."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [describe(a) for a in args if a is not type(None)]
        return " or ".join(kinds) + (" or null" if type(None) in args else "")
    if typing.get_origin(hint) in (tuple, list):
        return f"a list, each {describe(args[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, f"a {getattr(hint, '__name__', hint)}"
    )


def require(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(field, value, allowed)


def require_bool(field: str, value: Any) -> None:
    require(isinstance(value, bool), field, value, "true or false")


def require_int(field: str, value: Any, minimum: int | None = None) -> None:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    bound = "" if minimum is None else f" >= {minimum}"
    require(is_int and (minimum is None or value >= minimum), field, value, f"an integer{bound}")


def require_float(
    field: str, value: Any, low: float | None = None, high: float | None = None
) -> None:
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = is_num and (low is None or value >= low) and (high is None or value <= high)
    bounds = f" in [{low}, {high}]" if low is not None and high is not None else ""
    bounds = (
        bounds
        or (f" >= {low}" if low is not None else "")
        or (f" <= {high}" if high is not None else "")
    )
    require(ok, field, value, f"a number{bounds}")


def require_choice(field: str, value: Any, choices: tuple | list) -> None:
    require(value in choices, field, value, "one of " + ", ".join(map(str, choices)))


def require_dataset_root(root: Any) -> None:
    """`dataset.root` of a dataset read from disk (coco, cub, folder) is a folder: checked by
    preflight before Lightning's import and by the datamodule for direct callers."""
    ok = root is not None and Path(root).is_dir()
    require(ok, "dataset.root", root, "an existing folder (docs/data.md)")
