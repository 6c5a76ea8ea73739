"""The image-caption LightningDataModule every dataset builds on, and the batch format every
stage reads (datasets: `shapes.py`, `coco.py`, `cub.py`, `folder.py`, `web_datamodule.py`).

Batch: {"image": (B, 3, S, S) float in [0, 1], "caption": list[str], "record": list[dict]}.
"""

from __future__ import annotations

from functools import partial

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dalle_lightning.config import require_int
from dalle_lightning.data.resumable import ResumableLoader, ResumableSampler, SeededDraws, run_seed
from dalle_lightning.data.workers import worker_options


def collate_image_text(items: list[dict]) -> dict:
    """Stack images; keep captions and attribute records as lists (records vary in shape)."""
    batch = {"image": torch.stack([it["image"] for it in items])}
    for key in items[0]:
        if key != "image":
            batch[key] = [it[key] for it in items]
    return batch


class ImageTextDataModule(LightningDataModule):
    """Loaders over per-split datasets that a subclass builds in `build_datasets`."""

    def __init__(
        self, batch_size: int = 32, eval_batch_size: int | None = None, num_workers: int = 0
    ):
        super().__init__()
        require_int("batch_size", batch_size, 1)
        require_int("num_workers", num_workers, 0)
        if eval_batch_size is not None:
            require_int("eval_batch_size", eval_batch_size, 1)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.datasets: dict[str, Dataset] = {}

    def build_datasets(self) -> dict[str, Dataset]:
        raise NotImplementedError

    def identity(self) -> dict:
        """Everything that decides the images and captions of every split (token cache key)."""
        raise NotImplementedError

    def source(self, split: str) -> str:
        """The data behind `split`: two splits with the same source share one token cache
        (COCO's val serves val and test). Each split is its own source by default."""
        return split

    def cache_dataset(self, split: str) -> Dataset:
        """What the stage-2 token cache encodes for `split` (no random augmentation)."""
        self.setup()
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            self.datasets = self.build_datasets()

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        self.setup()
        return self.make_loader(self.datasets[split], train, collate_image_text)

    def make_loader(
        self, dataset: Dataset, train: bool, collate_fn, owner: LightningDataModule | None = None
    ) -> DataLoader:
        """This datamodule's batch sizes and workers over any dataset (stage 2 reuses it).

        The training loader is resumable (`resumable.py`): its order and per-item randomness
        depend only on (seed, epoch, index), and `owner`'s trainer says where an epoch stands.
        """
        common = dict(collate_fn=collate_fn, **worker_options(self.num_workers))
        rank, world_size = rank_and_world(owner or self)
        if not train:  # sharded as Lightning would (padded with repeats to equal shares)
            sampler = (
                DistributedSampler(dataset, world_size, rank, shuffle=False)
                if world_size > 1
                else None
            )
            return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, **common)
        seed = run_seed()
        return ResumableLoader(
            SeededDraws(dataset, seed),
            sampler=ResumableSampler(len(dataset), seed, rank=rank, world_size=world_size),
            progress=partial(batches_trained, owner or self),
            batch_size=self.batch_size,
            drop_last=True,
            **common,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def data_report(self) -> dict:
        """Per source: listed, usable, skipped and converted counts (`quality.py`); the
        built-in shapes are rendered, so they have none."""
        return {}

    def split_dataloader(self, split: str) -> DataLoader:
        """Any split by name (e.g. 'heldout'), in a fixed order."""
        return self._loader(split)


def rank_and_world(datamodule: LightningDataModule) -> tuple[int, int]:
    """(global rank, world size) of the trainer `datamodule` is attached to; (0, 1) alone."""
    trainer = getattr(datamodule, "trainer", None)
    return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)


def batches_trained(datamodule: LightningDataModule) -> int:
    """Batches of the current epoch that training has taken (0 outside `trainer.fit`)."""
    trainer = datamodule.trainer
    return trainer.fit_loop.epoch_loop.batch_progress.current.ready if trainer else 0
