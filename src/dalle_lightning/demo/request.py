"""What the demo page asks for, checked: a caption and sampling settings from a person.

Every value that arrives from the page (or from its API) passes `check_request` before any
work; a bad one raises `DemoInputError` with a message for the page that names the field, the
value and what to do. Nothing here knows about Gradio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dalle_lightning.config import ConfigError, require_int
from dalle_lightning.sampling.sampler import SamplingConfig, resolve_sampling


class DemoInputError(ValueError):
    """A value from the page that cannot be used; its message is shown on the page."""


@dataclass(frozen=True)
class DemoLimits:
    """Bounds on one request (conf/demo.yaml `limits`)."""

    max_candidates: int = 64
    max_caption_chars: int = 1000

    def __post_init__(self) -> None:
        require_int("limits.max_candidates", self.max_candidates, 1)
        require_int("limits.max_caption_chars", self.max_caption_chars, 1)


@dataclass(frozen=True)
class DemoRequest:
    caption: str
    candidates: int
    seed: int
    sampling: SamplingConfig


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or value is None or value == "":
        raise DemoInputError(f"{name}: no value given; type a number.")
    try:
        number = float(value)  # the page sends numbers, its API may send strings
    except (TypeError, ValueError):
        raise DemoInputError(f"{name}: {value!r} is not a number.") from None
    if not math.isfinite(number):
        raise DemoInputError(f"{name}: {value!r} is not a finite number.")
    return number


def _whole(name: str, value: object, low: int, high: int, hint: str = "") -> int:
    number = _number(name, value)
    if number != int(number) or not low <= number <= high:
        raise DemoInputError(
            f"{name}: {value!r} is out of range; use a whole number from {low} to {high}{hint}."
        )
    return int(number)


def check_request(
    caption: object,
    candidates: object,
    temperature: object,
    top_k: object,
    top_p: object,
    cond_scale: object,
    seed: object,
    limits: DemoLimits,
    trained: SamplingConfig,
    guidance_trained: bool,
) -> DemoRequest:
    """The page's values as a `DemoRequest`. top_k 0 and top_p 1 turn those filters off;
    settings the page does not show (Jacobi windows) are the checkpoint's (`trained`)."""
    if not isinstance(caption, str) or not caption.strip():
        raise DemoInputError("Caption: it is empty; type what the image should show.")
    if len(caption) > limits.max_caption_chars:
        raise DemoInputError(
            f"Caption: {len(caption):,} characters is too long; use at most "
            f"{limits.max_caption_chars:,} (the model reads only its first few dozen tokens)."
        )
    n = _whole("Candidates", candidates, 1, limits.max_candidates)
    temp = _number("Temperature", temperature)
    if temp <= 0:
        raise DemoInputError(
            f"Temperature: {temperature!r} must be above 0 (lower keeps to the likeliest codes: "
            "try 0.5; for only the likeliest code set top-k to 1)."
        )
    k = _whole("Top-k", top_k, 0, 2**31 - 1, " (0 turns it off)")
    p = _number("Top-p", top_p)
    if not 0 < p <= 1:
        raise DemoInputError(f"Top-p: {top_p!r} must be in (0, 1]; 1 turns it off.")
    scale = _number("Guidance scale", cond_scale)
    seed_value = _whole("Seed", seed, 0, 2**32 - 1)
    given = {
        "temperature": temp,
        "top_k": k or None,
        "top_p": p,
        "cond_scale": scale,
        "jacobi_window": trained.jacobi_window,
    }
    try:
        sampling = resolve_sampling(given, SamplingConfig(), guidance_trained)
    except ConfigError as err:  # guidance on a prior trained without blank captions, ...
        names = {"cond_scale": "Guidance scale", "jacobi_window": "Jacobi window"}
        field = err.field.removeprefix("sampling.")
        raise DemoInputError(
            f"{names.get(field, field)}: {err.value!r} cannot be used; {err.allowed}."
        ) from None
    return DemoRequest(caption, n, seed_value, sampling)
