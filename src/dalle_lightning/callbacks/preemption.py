"""Pre-emption: on SIGTERM (or SLURM's requeue signal), checkpoints/last.ckpt at the current
step, then a clean exit.

SLURM (before a time limit or pre-emption) and cloud spot instances send SIGTERM some seconds
before they kill a job. Lightning's signal handler notes it, and its training loop stops at the
next batch boundary by raising `SIGTERMException`. This callback writes `last.ckpt` in
`on_train_batch_end` of the step the signal arrived in, after every other callback's hook (it
is a `Checkpoint`, which Lightning runs last) and before that raise: the checkpoint then holds
exactly what a periodic save at that step holds, so it resumes bitwise (a save made after the
raise, at an epoch's last batch, resumed one batch off). Under DDP/FSDP the ranks first
agree whether any of them was signalled (one all-reduce of a flag per step), so they save and
stop at the same step. The entry scripts turn the exception into one line saying how to
resume, and exit code 4 (`cli.EXIT_PREEMPTED`). Lightning's own
`ModelCheckpoint(save_on_exception=True)` would write a second, step-named copy of the whole
checkpoint, which at the paper's size is tens of gigabytes of disk for nothing.

SLURM's requeue signal (`SLURMEnvironment.requeue_signal`, SIGUSR1; `#SBATCH --signal=USR1@90`)
takes the same path and then calls `scontrol requeue <job id>`; the job SLURM starts again
resumes from that last.ckpt by itself (`runs.py`). It replaces Lightning's auto-requeue handler,
which writes its checkpoint from inside the signal handler, at whatever point of a step (or of
a checkpoint save in progress) the signal arrived.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class CheckpointOnSigterm(Checkpoint):
    """A `Checkpoint` so that Lightning runs it after the other callbacks, with the
    ModelCheckpoints: what it saves has seen this step's EMA update and every other hook.
    It writes through the first ModelCheckpoint's directory; alone (`trainer.checkpoint_callback`
    is then this one) it has neither a directory nor a best model."""

    dirpath: str | None = None
    best_model_path = ""

    def __init__(self) -> None:
        self._saved_at: int | None = None
        self._requeue = False
        self._previous_handler = None
        self._requeue_signal: int | None = None

    # SLURM's requeue signal ---------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        if not isinstance(environment, SLURMEnvironment) or environment.requeue_signal is None:
            return
        self._requeue_signal = environment.requeue_signal

        def requeue_requested(signum, frame) -> None:  # only notes it: the loop acts on it
            self._requeue = True
            trainer._signal_connector.received_sigterm = True

        self._previous_handler = signal.signal(self._requeue_signal, requeue_requested)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        if self._requeue_signal is not None and self._previous_handler is not None:
            signal.signal(self._requeue_signal, self._previous_handler)
        self._previous_handler = None

    # the checkpoint -----------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        signalled = trainer.received_sigterm
        if trainer.world_size > 1:  # every rank stops at the same step if any was signalled
            signalled = trainer.strategy.reduce_boolean_decision(signalled, all=False)
            if signalled:
                trainer._signal_connector.received_sigterm = True
        if signalled and not trainer.sanity_checking:
            self._save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        self._restore_handler()
        if self._saved_at != trainer.global_step:  # the signal came after this hook ran
            if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
                # at an epoch's end a save now would resume one batch off: keep the periodic
                # last.ckpt (resuming repeats the steps since it)
                log.warning(
                    "SIGTERM at the end of an epoch (step %d): checkpoints/last.ckpt is the "
                    "newest periodic save",
                    trainer.global_step,
                )
            else:  # mid-epoch (during validation, or later hooks of this batch): exact
                self._save(trainer)
        if self._requeue and trainer.is_global_zero:
            _scontrol_requeue()

    def _save(self, trainer: pl.Trainer) -> None:
        callback = next(
            (c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None
        )
        if callback is None or not callback.dirpath or self._saved_at == trainer.global_step:
            return
        path = Path(callback.dirpath) / "last.ckpt"
        trainer.save_checkpoint(path)
        self._saved_at = trainer.global_step
        what = "SLURM's requeue signal" if self._requeue else "SIGTERM"
        log.warning("%s: training stopped at step %d; %s written", what, trainer.global_step, path)


def _scontrol_requeue() -> None:
    """`scontrol requeue` this job (an array task as <array job>_<task>), as Lightning does."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else None
    job = job or os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_]+", job):
        log.warning("no SLURM job id to requeue (SLURM_JOB_ID=%r)", job)
        return
    result = subprocess.call(["scontrol", "requeue", job])
    if result == 0:
        log.warning("SLURM job %s requeued: it resumes from last.ckpt when it starts again", job)
    else:
        log.warning("scontrol requeue %s failed (exit code %d)", job, result)
