"""Your own images: a folder and a `captions.jsonl` with one JSON object per line,

    {"image": "relative/path.jpg", "caption": "a dog on a sofa"}
    {"image": "other.png", "captions": ["first caption", "second caption"]}

Paths are relative to the folder. A line that is not such an object stops with its line
number; missing, broken or caption-less images are skipped and counted (`quality.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

from dalle_lightning.config import require
from dalle_lightning.data.captioned_images import CaptionedImage, CaptionedImagesDataModule


def read_folder(root: str | Path, captions_file: str = "captions.jsonl") -> list[CaptionedImage]:
    root = Path(root)
    path = root / captions_file
    require(
        path.is_file(),
        "dataset.root",
        str(root),
        f"a folder of images with a {captions_file} (lines of "
        '{"image": "relative/path.jpg", "caption": "..."})',
    )
    items = []
    text = path.read_text(encoding="utf-8", errors="surrogateescape")  # audit cleans bad bytes
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            captions = entry["captions"] if "captions" in entry else [entry["caption"]]
            image = entry["image"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path}:{number}: expected "
                '{"image": "relative/path.jpg", "caption": "..."} or "captions": [...], '
                f"got {line[:80]!r} ({type(err).__name__}: {err})"
            ) from None
        captions = [captions] if isinstance(captions, str) else captions
        items.append(CaptionedImage(root / str(image), tuple(str(c) for c in captions)))
    return items


class FolderDataModule(CaptionedImagesDataModule):
    """One captions file: its last `val_fraction` of images (at least one) are val and test,
    the rest train."""

    def __init__(
        self, root: str, captions_file: str = "captions.jsonl", val_fraction: float = 0.05, **kw
    ):
        super().__init__(root, **kw)
        require(0 < val_fraction < 1, "dataset.val_fraction", val_fraction, "in (0, 1)")
        self.captions_file, self.val_fraction = captions_file, val_fraction

    def read(self, source: str) -> list[CaptionedImage]:
        everything = read_folder(self.root, self.captions_file)
        n_val = max(1, round(self.val_fraction * len(everything)))
        require(
            len(everything) > n_val,
            "dataset.root",
            str(self.root),
            f"at least 2 captioned images (found {len(everything)})",
        )
        return everything[:-n_val] if source == "train" else everything[-n_val:]

    def identity(self) -> dict:
        return {
            "dataset": "folder",
            "captions_file": self.captions_file,
            "val_fraction": self.val_fraction,
            **super().identity(),
        }
