"""Pre-emption: on SIGTERM, checkpoints/last.ckpt at the current step, then a clean exit.

SLURM (before a time limit or pre-emption) and cloud spot instances send SIGTERM some seconds
before they kill a job. Lightning's signal handler notes it, and its training loop stops at the
next batch boundary by raising `SIGTERMException` (all ranks agree); this callback then writes
`last.ckpt` at that step, through Lightning's atomic save, so nothing trained is lost. The
entry scripts turn the exception into one line saying how to resume, and exit code 4
(`cli.EXIT_PREEMPTED`). Lightning's own `ModelCheckpoint(save_on_exception=True)` would also
write a second, step-named copy of the whole checkpoint, which at the paper's size is tens of
gigabytes of disk for nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class CheckpointOnSigterm(pl.Callback):
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        callback = trainer.checkpoint_callback
        if not isinstance(exception, SIGTERMException) or callback is None:
            return
        if not callback.dirpath or trainer.sanity_checking:
            return
        path = Path(callback.dirpath) / "last.ckpt"
        trainer.save_checkpoint(path)
        log.warning("SIGTERM: training stopped at step %d; %s written", trainer.global_step, path)
