"""Random numbers in a training step as a function of (seed, epoch, batch, rank).

Before every training batch the global torch, numpy and Python generators are re-seeded from
the run's seed and the batch's position, so the Gumbel noise, dropout and anything else a step
draws depend only on where training is, never on what ran before (validation, a restart, the
sample grids). A run resumed from a checkpoint therefore draws exactly the numbers the
uninterrupted run drew: with `trainer.deterministic=true` on CPU its weights end bitwise equal
(tests/test_resume.py). Each DDP rank gets its own stream.
"""

from __future__ import annotations

import random

import lightning.pytorch as pl
import numpy as np
import torch

from dalle_lightning.config import require_int
from dalle_lightning.data.resumable import derived_seed


class StepSeed(pl.Callback):
    def __init__(self, seed: int):
        require_int("seed", seed, 0)
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        value = derived_seed(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank)
        if pl_module.device.type == "cpu":
            # the generator CPU ops draw from; torch.manual_seed would also queue a seed for
            # every accelerator not started (CUDA, XPU, MTIA), each with a formatted stack
            # trace: 0.8-1.8 ms a step on a 2-core CPU (docs/speed.md)
            torch.default_generator.manual_seed(value)
        else:
            torch.manual_seed(value)
        np.random.seed(value % 2**32)
        random.seed(value)
