"""Step schedules of both stages (Ramesh et al., 2021, sec. A.2 and B.2), as pure functions of
the global step, so that a resumed run recomputes the same value from the step alone.

Typed configs, mirrored by flat keys of conf/model/<stage>.yaml: `DVAESchedule` (beta
warm-up, tau anneal, learning-rate warm-up and decay), `PriorSchedule` (warm-up, halvings on
plateaus, end anneal, gradient clipping), `ClipSchedule` (warm-up, cosine decay).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dalle_lightning.config import require_float, require_int


def cosine_anneal(step: int, start: float, end: float, steps: int) -> float:
    """`start` at step 0 to `end` at `steps` along half a cosine, then `end` forever.

    The paper anneals beta (0 -> 6.6), tau (1 -> 1/16) and the learning rate this way.
    """
    if steps <= 0:
        return end
    progress = min(max(step, 0), steps) / steps
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def linear_warmup(step: int, steps: int) -> float:
    """Factor (step + 1) / steps up to 1, then 1 forever; always 1 when `steps` is 0.

    The prior's warm-up (paper B.2). Not in the paper's dVAE schedule: at lr 3e-3 the small
    8x-downsampling shapes dVAE otherwise dies in its first steps (constant output) for most
    seeds (docs/results.md).
    """
    return min(1.0, (step + 1) / steps) if steps > 0 else 1.0


@dataclass(frozen=True)
class DVAESchedule:
    """The dVAE's schedules: beta 0 -> `DVAELoss.beta` over `kl_warmup_steps`, tau `tau_start`
    -> `tau_end` over `temp_anneal_steps` (cosines), the learning rate cosine-decayed to
    `lr_final_ratio` of its initial value over `lr_decay_steps` (null: trainer.max_steps),
    after an optional linear warm-up. Paper: 5000, 1 -> 1/16 over 150,000, 0.0125 over 1.2M,
    no warm-up.

    Not in the paper: from step `decoder_only_from` on (null: never) only the decoder trains,
    on the encoder's argmax codes (the codes the prior and generation use), with the encoder
    frozen. The learning rate then decays over the steps before it (when `lr_decay_steps` is
    null), and the phase has a cosine of its own, from `decoder_only_lr_ratio` of the initial
    learning rate to `lr_final_ratio` of that, over the steps left to trainer.max_steps."""

    kl_warmup_steps: int = 5000
    tau_start: float = 1.0
    tau_end: float = 1 / 16
    temp_anneal_steps: int = 150_000
    lr_final_ratio: float = 0.0125
    lr_decay_steps: int | None = None
    lr_warmup_steps: int = 0
    decoder_only_from: int | None = None
    decoder_only_lr_ratio: float = 1 / 3

    def __post_init__(self) -> None:
        require_int("kl_warmup_steps", self.kl_warmup_steps, 0)
        require_float("tau_start", self.tau_start, 1e-4)
        require_float("tau_end", self.tau_end, 1e-4, self.tau_start)
        require_int("temp_anneal_steps", self.temp_anneal_steps, 0)
        require_float("lr_final_ratio", self.lr_final_ratio, 0.0, 1.0)
        if self.lr_decay_steps is not None:
            require_int("lr_decay_steps", self.lr_decay_steps, 1)
        require_int("lr_warmup_steps", self.lr_warmup_steps, 0)
        if self.decoder_only_from is not None:
            require_int("decoder_only_from", self.decoder_only_from, 1)
        require_float("decoder_only_lr_ratio", self.decoder_only_lr_ratio, 0.0, 1.0)

    def decoder_only(self, step: int) -> bool:
        """Whether `step` trains the decoder alone."""
        return self.decoder_only_from is not None and step >= self.decoder_only_from

    def beta(self, step: int, final: float) -> float:
        return cosine_anneal(step, 0.0, final, self.kl_warmup_steps)

    def tau(self, step: int) -> float:
        return cosine_anneal(step, self.tau_start, self.tau_end, self.temp_anneal_steps)

    def lr_factor(self, step: int, decay_steps: int, max_steps: int = 0) -> float:
        if self.decoder_only(step):
            start = self.decoder_only_from
            phase, ratio = max(1, max_steps - start), self.decoder_only_lr_ratio
            return ratio * cosine_anneal(step - start, 1.0, self.lr_final_ratio, phase)
        warm = linear_warmup(step, self.lr_warmup_steps)
        return warm * cosine_anneal(step, 1.0, self.lr_final_ratio, decay_steps)


@dataclass(frozen=True)
class PriorSchedule:
    """The prior's optimisation (paper B.2): a linear warm-up over `warmup_steps`, then the
    learning rate halved whenever val/loss has not improved for `plateau_patience`
    validations, at most `max_lr_halvings` times; gradient norm clipped at `grad_clip_norm`.
    Not in the paper, for short runs that never plateau: `anneal_fraction` > 0 takes the
    learning rate down to 0 along half a cosine over that last share of trainer.max_steps."""

    warmup_steps: int = 200
    plateau_patience: int = 2
    plateau_factor: float = 0.5
    max_lr_halvings: int = 5
    anneal_fraction: float = 0.0
    grad_clip_norm: float | None = 4.0

    def __post_init__(self) -> None:
        require_int("warmup_steps", self.warmup_steps, 0)
        require_int("plateau_patience", self.plateau_patience, 0)
        require_float("plateau_factor", self.plateau_factor, 1e-6, 1.0)
        require_int("max_lr_halvings", self.max_lr_halvings, 0)
        require_float("anneal_fraction", self.anneal_fraction, 0.0, 1.0)
        if self.grad_clip_norm is not None:
            require_float("grad_clip_norm", self.grad_clip_norm, 1e-12)

    def lr_factor(self, step: int, halvings: int = 0, max_steps: int = 0) -> float:
        """Warm-up ramp x plateau halvings x, over the last `anneal_fraction` of `max_steps`,
        half a cosine down to 0 (off when either is 0)."""
        factor = linear_warmup(step, self.warmup_steps) * self.plateau_factor**halvings
        anneal = round(self.anneal_fraction * max_steps)
        if anneal > 0:
            factor *= cosine_anneal(step - (max_steps - anneal), 1.0, 0.0, anneal)
        return factor


class PlateauHalvings:
    """How many times `PriorSchedule` has halved the learning rate, updated after every
    validation with its val/loss; `state()` goes into checkpoints (`lr_plateau`)."""

    def __init__(self, schedule: PriorSchedule):
        self.schedule = schedule
        self.halvings, self.best, self.bad_validations = 0, float("inf"), 0

    def update(self, val_loss: float) -> bool:
        """Record one validation; True if the learning rate was halved now."""
        best = self.best
        if not math.isfinite(best) or val_loss < best - 1e-4 * abs(best):  # improved
            self.best, self.bad_validations = val_loss, 0
            return False
        self.bad_validations += 1
        if self.bad_validations <= self.schedule.plateau_patience:
            return False
        self.bad_validations = 0
        if self.halvings >= self.schedule.max_lr_halvings:
            return False
        self.halvings += 1
        return True

    def state(self) -> list:
        return [self.halvings, self.best, self.bad_validations]

    def load(self, state: list) -> None:
        self.halvings, self.best, self.bad_validations = state


@dataclass(frozen=True)
class ClipSchedule:
    """The in-project CLIP's learning rate: linear warm-up over `warmup_steps`, then a cosine
    decay to `lr_final_ratio` of its peak at trainer.max_steps."""

    warmup_steps: int = 100
    lr_final_ratio: float = 0.05

    def __post_init__(self) -> None:
        require_int("warmup_steps", self.warmup_steps, 0)
        require_float("lr_final_ratio", self.lr_final_ratio, 0.0, 1.0)

    def lr_factor(self, step: int, total: int) -> float:
        if step < self.warmup_steps:
            return linear_warmup(step, self.warmup_steps)
        decay = max(1, total - self.warmup_steps)
        return cosine_anneal(step - self.warmup_steps, 1.0, self.lr_final_ratio, decay)
