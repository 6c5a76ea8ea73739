"""callbacks/step_seed.StepSeed: each training batch's draws are a function of where it is."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import torch

from dalle_lightning.callbacks.step_seed import StepSeed
from dalle_lightning.data.resumable import derived_seed


def draws() -> tuple:
    return torch.rand(4), torch.randn(3), np.random.rand(2), random.random()


def test_a_batch_on_cpu_draws_what_torch_manual_seed_of_its_seed_gives():
    """On CPU only the default generator is seeded (torch.manual_seed also queues a seed for
    each accelerator not started, with a stack trace): the draws are torch.manual_seed's."""
    trainer = SimpleNamespace(current_epoch=2, global_rank=1)
    cpu_module = SimpleNamespace(device=torch.device("cpu"))
    value = derived_seed(1234, 2, 7, 1)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)
    expected = draws()

    torch.rand(100)  # whatever ran before
    StepSeed(1234).on_train_batch_start(trainer, cpu_module, None, 7)
    got = draws()
    for a, b in zip(got, expected, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    StepSeed(1234).on_train_batch_start(trainer, cpu_module, None, 8)  # the next batch: others
    assert not torch.equal(draws()[0], expected[0])
