"""Images on disk with their captions: the dataset behind `dataset=coco`, `cub` and `folder`.

A split is a list of `CaptionedImage(path, captions)`; the readers in `coco.py`, `cub.py`
and `folder.py` build those lists from each dataset's own layout. One item per image:
the training split draws one of the image's captions at random each time (the paper samples
a caption per image), the other splits always take the first, so evaluation is repeatable.

The lists reach this class through `quality.audit`, which has skipped and counted every
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

from dalle_lightning.data.quality import BadImage, load_rgb

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
