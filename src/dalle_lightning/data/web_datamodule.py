"""`dataset=webdataset`: image + caption tar shards streamed from disk or URLs (webdataset).

Shards come from `python -m dalle_lightning.data.shards write` (a manifest per split names
them and counts the samples) or from anywhere webdataset reads: brace patterns
(`/data/train-{000000..000999}.tar`), `https://...`, `pipe:aws s3 cp s3://... -`.

- training: every world_size-th shard per rank (the trainer's rank), split again across
  loader workers (`split_by_worker`), shard order shuffled, samples mixed in a
  `shuffle_buffer`; every rank's stream repeats, and an epoch is `train_size / global batch`
  batches, so all ranks take the same number of steps. Too few shards for ranks x workers
  fail when fit starts, before the first step. A stream keeps no position: a resumed run
  does not continue the interrupted pass's sample order.
- val / test: each sample once, in shard order; loader workers split the shards, and ranks
  take every world_size-th sample of what each worker reads (no rank is left empty).
- stage 2: the token cache encodes the val/test/train streams once, or reads token shards
  that `shards encode` wrote with this dVAE (`token_shards`).
Unreadable images are skipped with a warning (a stream cannot be audited up front).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from dalle_lightning.config import ConfigError, require, require_choice, require_int
from dalle_lightning.data.captioned_images import MAX_IMAGE_PIXELS
from dalle_lightning.data.datamodule import (
    ImageTextDataModule,
    collate_image_text,
    rank_and_world,
)
from dalle_lightning.data.quality import BadImage, decode_rgb
from dalle_lightning.data.resumable import run_seed
from dalle_lightning.data.shards import IMAGE_EXTENSIONS, read_manifest, read_token_shards
from dalle_lightning.data.transforms import TRANSFORMS, EvalTransform
from dalle_lightning.data.workers import worker_options

log = logging.getLogger(__name__)


class _Decode:
    """A shard sample -> {"image", "caption", "captions", "key"}, or None for an unreadable
    image."""

    def __init__(self, transform, random_caption: bool, max_pixels: int):
        self.transform, self.random_caption, self.max_pixels = transform, random_caption, max_pixels

    def __call__(self, sample: dict) -> dict | None:
        name = Path(f"{sample.get('__url__', '')}/{sample['__key__']}")
        extension = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
        try:
            if extension is None:
                raise BadImage("missing", name, "no image member in the sample")
            image, _ = decode_rgb(io.BytesIO(sample[extension]), name, self.max_pixels)
            captions = json.loads(sample["json"])["captions"] if "json" in sample else []
            if not captions:
                raise BadImage("no_caption", name)
        except (BadImage, ValueError, KeyError) as err:
            log.warning("skipped: %s", err)
            return None
        k = int(torch.randint(len(captions), ())) if self.random_caption else 0
        item = {"image": self.transform(image), "caption": captions[k], "captions": captions}
        return {**item, "key": sample["__key__"]}


def _is_usable(item: dict | None) -> bool:
    """False for an image _Decode could not read (a named function: workers unpickle it)."""
    return item is not None


class _EveryNth:
    """Keeps every `world`-th item from the `rank`-th on: a rank's shards (webdataset's
    nodesplitter, by the trainer's rank: srun sets no RANK variable) or, for evaluation, a
    rank's samples. Evaluation splits samples, not shards, so every rank gets at least one
    and logs the same metrics (a rank with none would leave the others waiting in the
    epoch-end sync)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def __call__(self, items):
        for index, item in enumerate(items):
            if index % self.world == self.rank:
                yield item


class WebDataModule(ImageTextDataModule):
    def __init__(
        self,
        root: str | None = None,
        train: str | list[str] | None = None,
        val: str | list[str] | None = None,
        test: str | list[str] | None = None,
        train_size: int | None = None,
        image_size: int = 256,
        train_transform: str = "dvae",
        shuffle_buffer: int = 1000,
        token_shards: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ):
        super().__init__(batch_size, eval_batch_size, num_workers)
        require_int("dataset.image_size", image_size, 8)
        require_int("dataset.shuffle_buffer", shuffle_buffer, 1)
        require_int("dataset.max_image_pixels", max_image_pixels, 1)
        require_choice("dataset.train_transform", train_transform, tuple(TRANSFORMS))
        self.root, self.image_size, self.train_transform = root, image_size, train_transform
        self.shuffle_buffer, self.max_pixels = shuffle_buffer, max_image_pixels
        self.token_shards = token_shards
        self.urls: dict[str, list[str]] = {}
        self.counts: dict[str, int | None] = {}
        for split, given in (("train", train), ("val", val), ("test", test)):
            self.urls[split], self.counts[split] = self._shards(split, given)
        if train_size is not None:
            require_int("dataset.train_size", train_size, 1)
            self.counts["train"] = train_size
        require(
            self.counts["train"] is not None,
            "dataset.train_size",
            None,
            "the number of training samples (no manifest gives it for these URLs)",
        )

    def _shards(self, split: str, given) -> tuple[list[str], int | None]:
        if given:  # patterns or URLs; brace ranges are expanded here
            patterns = [given] if isinstance(given, str) else list(given)
            urls = [u for p in patterns for u in wds.shardlists.expand_urls(p)]
            return urls, None
        require(
            self.root is not None,
            f"dataset.{split}",
            None,
            "shard patterns or URLs, or dataset.root: a folder `shards write` made",
        )
        try:
            manifest = read_manifest(self.root, split, "images")
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError("dataset.root", self.root, str(err)) from None
        return [str(Path(self.root) / name) for name in manifest["shards"]], manifest["count"]

    def identity(self) -> dict:
        return {"dataset": "webdataset", "urls": self.urls, "image_size": self.image_size}

    def source(self, split: str) -> str:
        """Splits over the same shards (COCO's val and test) share one token cache."""
        return next(other for other in self.urls if self.urls[other] == self.urls[split])

    def setup(self, stage: str | None = None) -> None:  # streams: nothing to build up front
        return None

    def data_report(self) -> dict:
        return {}

    def stream(self, split: str, train: bool = False, all_ranks: bool = False) -> IterableDataset:
        """One split as a webdataset pipeline of decoded items (see the module docstring);
        `all_ranks`: every shard in this process (the token cache encodes whole splits)."""
        urls = self.urls[split]
        require(bool(urls), f"dataset.{split}", urls, "at least one shard")
        transform = TRANSFORMS[self.train_transform] if train else EvalTransform
        decode = _Decode(transform(self.image_size), train, self.max_pixels)
        rank, world = (0, 1) if all_ranks else rank_and_world(self)
        if not train:  # every rank reads every shard and keeps every world-th sample
            dataset = wds.WebDataset(
                urls,
                shardshuffle=False,
                nodesplitter=_EveryNth(0, 1),
                workersplitter=wds.split_by_worker,
                empty_check=False,
            )
            return dataset.compose(_EveryNth(rank, world)).map(decode).select(_is_usable)
        readers = world * max(1, self.num_workers)
        require(
            len(urls) >= readers,
            "dataset.train",
            f"{len(urls)} shards",
            f"at least one shard per rank x loader worker ({world} x "
            f"{max(1, self.num_workers)} = {readers}): write smaller shards (--maxcount) or "
            "use fewer dataset.num_workers",
        )
        dataset = wds.WebDataset(
            urls,
            shardshuffle=len(urls),
            nodesplitter=_EveryNth(rank, world),
            workersplitter=wds.split_by_worker,
            seed=run_seed(),
            empty_check=False,
        )
        return dataset.repeat().shuffle(self.shuffle_buffer).map(decode).select(_is_usable)

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        workers = worker_options(self.num_workers)
        if not train:
            return DataLoader(
                self.stream(split),
                batch_size=self.eval_batch_size,
                collate_fn=collate_image_text,
                **workers,
            )
        _, world = rank_and_world(self)
        batches = self.counts["train"] // (self.batch_size * world)
        require(
            batches >= 1,
            "dataset.batch_size",
            self.batch_size,
            f"at most train_size / devices = {self.counts['train'] // world}",
        )
        batched = self.stream(split, train=True).batched(
            self.batch_size, collation_fn=collate_image_text, partial=False
        )
        loader = wds.WebLoader(batched, batch_size=None, **workers)
        return loader.with_epoch(batches).with_length(batches, silent=True)

    def cache_dataset(self, split: str) -> IterableDataset:
        return self.stream(split, all_ranks=True)

    def pre_encoded(self, split: str, dvae_sha256: str) -> dict | None:
        """The token shards `shards encode` wrote for `split` with this dVAE, or None."""
        if not self.token_shards:
            return None
        try:
            manifest = read_manifest(self.token_shards, split, "tokens")
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError("dataset.token_shards", self.token_shards, str(err)) from None
        require(
            manifest.get("dvae_sha256") == dvae_sha256,
            "dataset.token_shards",
            self.token_shards,
            f"token shards of this dVAE (they hold dVAE {manifest.get('dvae_sha256', '?')[:12]}"
            f"..., the prior uses {dvae_sha256[:12]}...): encode again with --dvae",
        )
        names = manifest["shards"]
        log.info("token shards: %s (%s, %d samples)", self.token_shards, split, manifest["count"])
        return read_token_shards([str(Path(self.token_shards) / n) for n in names])
