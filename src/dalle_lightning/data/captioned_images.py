"""Images on disk with their captions: the dataset behind `dataset=coco`, `cub` and `folder`.

A split is a list of `CaptionedImage(path, captions)`; the readers in `coco.py`, `cub.py`
and `folder.py` build those lists from each dataset's own layout. One item per image:
the training split draws one of the image's captions at random each time (the paper samples
a caption per image), the other splits always take the first, so evaluation is repeatable.

Images listed but missing on disk are dropped when the list is built (`drop_missing`),
counted and reported once, the way a partial download should be handled.
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

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionedImage:
    path: Path
    captions: tuple[str, ...]


def drop_missing(items: Sequence[CaptionedImage], what: str) -> list[CaptionedImage]:
    """The items whose image file exists; one log line says how many were dropped."""
    present, missing = [], []
    for it in items:
        (present if it.path.is_file() else missing).append(it)
    if missing:
        log.warning(
            "%s: %d of %d listed images are missing on disk and skipped (first: %s)",
            what,
            len(missing),
            len(items),
            missing[0].path,
        )
    return present


class CaptionedImages(Dataset):
    """Item: {"image": (3, S, S) float in [0, 1] from `transform`, "caption": str,
    "captions": all captions of the image (the token cache keeps them all)}."""

    def __init__(
        self,
        items: Sequence[CaptionedImage],
        transform: Callable[[Image.Image], Tensor],
        random_caption: bool = False,
    ):
        if not items:
            raise ValueError("no images: the caption list names no image that exists on disk")
        self.items, self.transform, self.random_caption = list(items), transform, random_caption

    def __len__(self) -> int:
        return len(self.items)

    def captions_of(self, index: int) -> list[str]:
        """Every caption of item `index`, without reading the image."""
        return list(self.items[index].captions)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        with Image.open(item.path) as image:
            pixels = self.transform(image.convert("RGB"))  # greyscale and CMYK become RGB
        k = int(torch.randint(len(item.captions), ())) if self.random_caption else 0
        return {"image": pixels, "caption": item.captions[k], "captions": list(item.captions)}
