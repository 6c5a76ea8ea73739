"""Skip optimizer steps whose gradients are not finite; stop after too many in a row.

A NaN/inf loss (or an fp16 overflow under 16-mixed) gives non-finite gradients. Before the
optimizer steps, every gradient is checked; if any is not finite, all gradients are dropped
(set to None), so AdamW leaves the weights and its moments untouched: the step is skipped,
counted (`train/nonfinite_steps`, in metrics.json) and logged. `max_in_row` skipped steps in a
row stop the run with `NonFiniteError`; no checkpoint written after the last finite step holds
anything but finite weights, so `checkpoints/last.ckpt` stays the last good one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch

from dalle_lightning.checkpoints import checkpoint_exists
from dalle_lightning.config import require_int

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced non-finite gradients too many steps in a row."""


class NonFiniteGuard(pl.Callback):
    def __init__(self, max_in_row: int = 20):
        require_int("max_in_row", max_in_row, 1)
        self.max_in_row = max_in_row
        self.skipped = 0  # total over the run (kept in checkpoints)
        self.in_row = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        # one fused norm per step (what clip_grad_norm_ uses) and one host sync: a norm is NaN
        # or inf iff its tensor has a non-finite value (or its squares overflow fp32, ~1e19)
        grads = [p.grad for p in params]
        finite = not grads or bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())
        if finite:
            self.in_row = 0
        else:
            for p in params:
                p.grad = None
            self.skipped += 1
            self.in_row += 1
            log.warning(
                "step %d: non-finite gradients (loss or overflow); step skipped (%d in a row, %d "
                "in total)",
                trainer.global_step,
                self.in_row,
                self.skipped,
            )
        pl_module.log("train/nonfinite_steps", float(self.skipped), on_step=True, on_epoch=False)
        if self.in_row >= self.max_in_row:
            raise NonFiniteError(
                f"{self.in_row} optimizer steps in a row had non-finite gradients (up to step "
                f"{trainer.global_step}); training stopped. The weights were never updated with "
                f"them, so {_last_checkpoint(trainer)} is the last good state. Lower the "
                "learning rate, check the data, or use trainer.precision=32-true; "
                "callbacks.nonfinite_guard.max_in_row sets the limit."
            )

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_row": self.in_row}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped, self.in_row = state_dict["skipped"], state_dict["in_row"]


def _last_checkpoint(trainer) -> str:
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath:
        path = Path(callback.dirpath) / "last.ckpt"
        if checkpoint_exists(path):
            return str(path)
    return "the newest checkpoints/last.ckpt (none written yet)"
