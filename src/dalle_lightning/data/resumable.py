"""A training order that survives a restart: shuffled by (seed, epoch), resumable mid-epoch.

- `ResumableSampler` yields *draws*, `epoch * n + index`, in an order that depends only on
  (seed, epoch); after `load_state_dict` it skips the samples of the batches already trained.
  Under DDP/FSDP it shards that order itself (rank r takes every world_size-th draw, the
  trainer runs with `use_distributed_sampler: false`): the global batch of step k is the one a
  single process with a world_size times larger batch takes, and resuming works per rank.
- `SeededDraws` wraps a dataset: a draw is mapped back to its index and the item is built under
  the torch generator seeded by (seed, draw), restored afterwards. Random crops and caption
  choices thus depend only on (seed, epoch, index) in the main process and in any worker, and
  loading never touches the generator the model draws its noise from.
- `ResumableLoader` is a DataLoader with `state_dict` / `load_state_dict`, Lightning's stateful
  loader protocol: Lightning stores {epoch, batches done} in every checkpoint and loads it before
  it iterates again, so a resumed epoch continues with the batch after the last trained one
  (counted by the trainer, not by the loader, which prefetches ahead).
BPE-dropout is covered too: the stage-2 dataset draws it from the same generator
(`text/bpe_dropout.py`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def run_seed() -> int:
    """The seed `lightning.seed_everything` set for this run (0 if none was set)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def derived_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys, via numpy's SeedSequence (no nearby-seed overlap)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0]) >> 1


class ResumableSampler(Sampler[int]):
    def __init__(
        self, length: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} with world_size={world_size}: 0 <= rank < world_size")
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skip = 0  # samples to skip at the start of the next iteration (once)

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it at every epoch start
        self.epoch = epoch

    def __len__(self) -> int:  # per rank; the last length % world_size draws are left out
        return self.length // self.world_size

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
            order = torch.randperm(self.length, generator=generator)
        else:
            order = torch.arange(self.length)
        order = order[self.rank : len(self) * self.world_size : self.world_size]
        skip, self.skip = self.skip, 0
        offset = self.epoch * self.length
        return iter((order[skip:] + offset).tolist())


class SeededDraws(Dataset):
    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, draw: int):
        index = draw % len(self.dataset)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: `torch.manual_seed` also seeds every accelerator lazily,
            # recording a stack trace each time: a large share of a prior step (docs/speed.md)
            torch.default_generator.manual_seed(derived_seed(self.seed, draw))
            return self.dataset[index]


class ResumableLoader(DataLoader):
    """`progress()` returns how many batches of the current epoch training has consumed."""

    def __init__(self, dataset: Dataset, *, sampler: ResumableSampler, progress: Callable, **kw):
        super().__init__(dataset, sampler=sampler, **kw)
        self.progress = progress

    def state_dict(self) -> dict:
        if not isinstance(self.sampler, ResumableSampler):  # Lightning swapped it (overfit)
            return {}
        return {"epoch": self.sampler.epoch, "batches": int(self.progress())}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict or not isinstance(self.sampler, ResumableSampler):
            return
        epoch, batches = state_dict["epoch"], state_dict["batches"]
        if batches >= len(self):  # saved after an epoch's last batch: Lightning starts the next
            epoch, batches = epoch + 1, 0
        self.sampler.epoch = epoch
        self.sampler.skip = batches * self.batch_size
