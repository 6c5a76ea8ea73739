"""Bad data in image-caption datasets: converted where possible, else skipped and counted.

`audit` looks at every listed (image, captions) pair once, before training, by decoding the
image the way training will (`load_rgb`), and returns the usable pairs with a report:

  skipped (the pair is left out)          converted (the pair is kept)
  missing       no file at the path        cmyk        CMYK -> RGB
  empty_file    zero bytes                 alpha       RGBA/LA/transparent palette, on white
  unreadable    not an image PIL knows     greyscale   L / 1-bit / palette -> RGB
  truncated     decoding fails part-way    16bit       16/32-bit integer -> 8 bits (scaled)
  too_large     more than max_image_pixels other_mode  YCbCr, LAB, HSV, float -> RGB
                (decompression-bomb guard)
  no_caption    no usable caption left     captions: empty ones dropped (empty_caption),
                                           overlong ones cut (caption_truncated), bytes that
                                           are not UTF-8 removed (caption_not_utf8)

`check_bad_fraction` stops with one line when a source has more unusable pairs than
`dataset.max_bad_fraction` allows: a wrong path or a broken download, not a few bad files.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from dalle_lightning.config import ConfigError
from dalle_lightning.data.workers import worker_options

log = logging.getLogger(__name__)

MAX_CAPTION_CHARS = 1000  # far beyond any text_seq_len; longer text is cut here
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes a reader kept with errors="surrogateescape"


class BadImage(Exception):
    """An image that cannot be used; `reason` is one of the skipped reasons above."""

    def __init__(self, reason: str, path: Path, detail: str = ""):
        super().__init__(f"{path}: {reason}{f' ({detail})' if detail else ''}")
        self.reason, self.path = reason, path


def load_rgb(
    path: Path, max_pixels: int, draft: int | None = None
) -> tuple[Image.Image, str | None]:
    """(the decoded RGB image, the conversion it needed or None); raises `BadImage`.
    `draft`: let JPEGs decode at a reduced scale of at least this size (the audit's check
    reads every byte all the same, in about 60% of the time)."""
    if not path.is_file():
        raise BadImage("missing", path)
    if path.stat().st_size == 0:
        raise BadImage("empty_file", path)
    return decode_rgb(path, path, max_pixels, draft)


def decode_rgb(
    file: Path | BinaryIO, path: Path, max_pixels: int, draft: int | None = None
) -> tuple[Image.Image, str | None]:
    """`load_rgb` for an open file or a path (a shard member is a file object): decodes with
    the same checks; `path` is what an error names."""
    try:
        with warnings.catch_warnings():  # the size check below replaces PIL's bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(file)
    except Image.DecompressionBombError as err:
        raise BadImage("too_large", path, str(err)) from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise BadImage("unreadable", path, str(err)) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise BadImage("too_large", path, f"{width}x{height} > {max_pixels} pixels")
        try:
            if draft:
                image.draft(image.mode, (draft, draft))
            image.load()
        except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt data
            raise BadImage("truncated", path, str(err)) from None
        return _to_rgb(image)


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    mode = image.mode
    if mode == "RGB":
        return image.copy(), None
    if (mode == "P" and "transparency" in image.info) or mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), "alpha"
    if mode == "CMYK":
        return image.convert("RGB"), "cmyk"
    if mode in ("L", "1", "P"):
        return image.convert("RGB"), "greyscale"
    if mode.startswith("I"):  # I;16, I;16B, I (16-bit PNG, 32-bit TIFF): scale to 8 bits
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) <= 65535 else float(values.max())
        grey = np.clip(values / top * 255 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB"), "16bit"
    if mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float64), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB"), "other_mode"
    return image.convert("RGB"), "other_mode"


def clean_caption(text: str) -> tuple[str | None, str | None]:
    """(usable caption or None, the conversion or drop reason or None)."""
    note = None
    if _UNDECODABLE.search(text):
        text, note = _UNDECODABLE.sub("", text), "caption_not_utf8"
    text = " ".join(text.split())
    if not text:
        return None, "empty_caption"
    if len(text) > MAX_CAPTION_CHARS:
        text, note = text[:MAX_CAPTION_CHARS], "caption_truncated"
    return text, note


class _Check(Dataset):
    def __init__(self, paths: Sequence[Path], max_pixels: int, draft: int | None):
        self.paths, self.max_pixels, self.draft = paths, max_pixels, draft

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str | None, str | None]:
        """(skip reason, conversion): one is None."""
        try:
            _, conversion = load_rgb(self.paths[index], self.max_pixels, self.draft)
        except BadImage as err:
            return err.reason, None
        return None, conversion


def audit(
    items: Sequence, max_pixels: int, num_workers: int, what: str, draft: int | None = None
) -> tuple[list, dict]:
    """(usable items with cleaned captions, report); items are `CaptionedImage`s. Costs one
    decode per image (JPEGs with `draft` at the training size; cost: docs/reliability.md)."""
    skipped: Counter = Counter()
    converted: Counter = Counter()
    with_captions = []
    for item in items:
        captions = []
        for raw in item.captions:
            text, note = clean_caption(str(raw))
            if note:
                converted[note] += 1
            if text:
                captions.append(text)
        if captions:
            with_captions.append(replace(item, captions=tuple(captions)))
        else:
            skipped["no_caption"] += 1
    checks = DataLoader(
        _Check([it.path for it in with_captions], max_pixels, draft),
        batch_size=None,
        **worker_options(num_workers, persistent=False),
    )
    usable, first_bad = [], {}
    for item, (reason, conversion) in zip(with_captions, checks, strict=True):
        if reason is None:
            usable.append(item)
            if conversion:
                converted[conversion] += 1
        else:
            skipped[reason] += 1
            first_bad.setdefault(reason, item.path)
    report = {
        "listed": len(items),
        "usable": len(usable),
        "skipped": dict(sorted(skipped.items())),
        "converted": dict(sorted(converted.items())),
    }
    if skipped:
        log.warning(
            "%s: %d of %d listed images skipped (%s); first of each: %s",
            what,
            sum(skipped.values()),
            len(items),
            ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())),
            ", ".join(f"{k}: {p}" for k, p in sorted(first_bad.items())),
        )
    if converted:
        log.info("%s: converted %s", what, dict(sorted(converted.items())))
    return usable, report


def check_bad_fraction(report: dict, max_bad_fraction: float, what: str) -> None:
    bad = report["listed"] - report["usable"]
    fraction = bad / max(report["listed"], 1)
    if fraction > max_bad_fraction or report["usable"] == 0:
        reasons = ", ".join(f"{k} {v}" for k, v in report["skipped"].items())
        raise ConfigError(
            "dataset.max_bad_fraction",
            max_bad_fraction,
            f"at least {fraction:.3g} to use {what}: {bad} of {report['listed']} listed images "
            f"({fraction:.1%}) are unusable ({reasons or 'none listed'}); fix the files or the "
            "path, or raise dataset.max_bad_fraction to train on the rest",
        )
