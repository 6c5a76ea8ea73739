"""Config validation shared by every typed config: one error type, one message format.

A user error in a config value becomes a `ConfigError` whose message is one line naming the
field, the value and what is allowed; the entry scripts print that line and exit with code 2.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value a user can fix. `field` is the dotted path as the user types it."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r} is invalid: {allowed}")

    def at(self, prefix: str) -> ConfigError:
        """The same error with the field placed under `prefix` (e.g. 'model.net')."""
        return ConfigError(f"{prefix}.{self.field}", self.value, self.allowed)


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
