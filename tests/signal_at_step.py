"""A callback the signal tests add to a training run (`+callbacks.signal._target_=...`): it
sends this process a signal at a chosen step and hook, so the test does not race the run."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl


class SignalAtStep(pl.Callback):
    def __init__(self, step: int, hook: str = "batch_end", signum: int = signal.SIGTERM):
        self.step, self.hook, self.signum, self.sent = step, hook, signum, False

    def _maybe(self, trainer: pl.Trainer, hook: str) -> None:
        if hook == self.hook and trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, *args) -> None:  # during the step
        self._maybe(trainer, "batch_start")

    def on_train_batch_end(self, trainer, *args) -> None:  # after CheckpointOnSigterm's hook
        self._maybe(trainer, "batch_end")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._maybe(trainer, "epoch_end")
