"""Images on disk with their captions: the dataset and the datamodule behind `dataset=coco`,
`cub` and `folder`.

A split is a list of `CaptionedImage(path, captions)`; the readers in `coco.py`, `cub.py`
and `folder.py` build those lists from each dataset's own layout. One item per image:
the training split draws one of the image's captions at random each time (the paper samples
a caption per image), the other splits always take the first, so evaluation is repeatable.

The training split goes through the paper's preprocessing (`train_transform`: `dvae` =
Listing 1 for stage 1, `prior` = Listing 2, `eval` = resize + centre crop); val and test
always through the deterministic `eval` transform. The token cache of stage 2 encodes every
split at the `eval` transform (`cache_dataset`) and keeps all captions of an image.

The lists reach the dataset through `quality.audit`, which has skipped and counted every
missing, broken or caption-less image; images are read by `quality.load_rgb` (mode
conversions, decompression-bomb guard). A file that breaks after the audit is replaced by the
next readable item, with a warning, rather than stopping a long run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dalle_lightning.config import (
    require_choice,
    require_dataset_root,
    require_float,
    require_int,
)
from dalle_lightning.data.datamodule import ImageTextDataModule
from dalle_lightning.data.quality import BadImage, audit, check_bad_fraction, load_rgb
from dalle_lightning.data.transforms import TRANSFORMS, EvalTransform

MAX_IMAGE_PIXELS = 50_000_000  # the default decompression-bomb limit (dataset.max_image_pixels)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionedImage:
    path: Path
    captions: tuple[str, ...]


class CaptionedImages(Dataset):
    """Item: {"image": (3, S, S) float in [0, 1] from `transform`, "caption": str,
    "captions": all captions of the image (the token cache keeps them all)}."""

    def __init__(
        self,
        items: Sequence[CaptionedImage],
        transform: Callable[[Image.Image], Tensor],
        random_caption: bool = False,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ):
        if not items:
            raise ValueError("no images: the caption list names no image that exists on disk")
        self.items, self.transform, self.random_caption = list(items), transform, random_caption
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def captions_of(self, index: int) -> list[str]:
        """Every caption of item `index`, without reading the image."""
        return list(self.items[index].captions)

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.items)):
            item = self.items[(index + offset) % len(self.items)]
            try:
                image, _ = load_rgb(item.path, self.max_pixels)
                break
            except BadImage as err:
                log.warning("%s; using the next image instead", err)
        else:
            raise RuntimeError("no image of this dataset can be read any more")
        pixels = self.transform(image)
        k = int(torch.randint(len(item.captions), ())) if self.random_caption else 0
        return {"image": pixels, "caption": item.captions[k], "captions": list(item.captions)}


class CaptionedImagesDataModule(ImageTextDataModule):
    """Subclasses say where each split's list comes from (`read`) and what names the data.
    The training split reads the dataset's "train"; val and test both read `eval_source`."""

    eval_source = "val"

    def __init__(
        self,
        root: str,
        image_size: int = 256,
        train_transform: str = "dvae",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        max_bad_fraction: float = 0.1,
    ):
        super().__init__(batch_size, eval_batch_size, num_workers)
        require_int("dataset.image_size", image_size, 8)
        require_int("dataset.max_image_pixels", max_image_pixels, 1)
        require_float("dataset.max_bad_fraction", max_bad_fraction, 0.0, 1.0)
        self.max_image_pixels, self.max_bad_fraction = max_image_pixels, max_bad_fraction
        self.reports: dict[str, dict] = {}
        require_choice("dataset.train_transform", train_transform, tuple(TRANSFORMS))
        require_dataset_root(root)
        self.root, self.image_size, self.train_transform = Path(root), image_size, train_transform
        self._items: dict[str, list[CaptionedImage]] = {}

    def source(self, split: str) -> str:
        return "train" if split == "train" else self.eval_source

    def read(self, source: str) -> list[CaptionedImage]:
        raise NotImplementedError

    def items(self, split: str) -> list[CaptionedImage]:
        """The usable pairs of the split's source, audited once (`quality.py`)."""
        source = self.source(split)
        if source not in self._items:
            what = f"{self.identity().get('dataset', 'dataset')} {source}"
            usable, report = audit(
                self.read(source), self.max_image_pixels, self.num_workers, what, self.image_size
            )
            check_bad_fraction(report, self.max_bad_fraction, what)
            self._items[source], self.reports[source] = usable, report
        return self._items[source]

    def data_report(self) -> dict:
        return dict(self.reports)

    def identity(self) -> dict:
        return {
            "root": str(self.root.resolve()),
            "image_size": self.image_size,
            "max_image_pixels": self.max_image_pixels,
        }

    def build_datasets(self) -> dict[str, Dataset]:
        train = TRANSFORMS[self.train_transform](self.image_size)
        return {
            split: CaptionedImages(
                self.items(split),
                train if split == "train" else EvalTransform(self.image_size),
                random_caption=split == "train",
                max_pixels=self.max_image_pixels,
            )
            for split in ("train", "val", "test")
        }

    def cache_dataset(self, split: str) -> Dataset:
        return CaptionedImages(
            self.items(split), EvalTransform(self.image_size), max_pixels=self.max_image_pixels
        )
