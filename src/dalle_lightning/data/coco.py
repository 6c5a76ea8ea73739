"""MS-COCO captions (2014 or 2017) in the official layout:

    <root>/annotations/captions_<split><year>.json
    <root>/<split><year>/<file_name>.jpg

About five captions per image. The paper evaluates on captions of the val split
(val2014 in the paper; 30,000 of them for FID/IS).
"""

from __future__ import annotations

import json
from pathlib import Path

from dalle_lightning.config import require
from dalle_lightning.data.captioned_images import CaptionedImage, CaptionedImagesDataModule

COCO_SPLITS = ("train", "val")
COCO_YEARS = (2014, 2017)


def read_coco(root: str | Path, split: str, year: int = 2017) -> list[CaptionedImage]:
    """The images of a COCO captions file that exist on disk, in the file's image order."""
    require(split in COCO_SPLITS, "dataset.split", split, "train or val")
    require(year in COCO_YEARS, "dataset.year", year, "2014 or 2017")
    root = Path(root)
    annotations = root / "annotations" / f"captions_{split}{year}.json"
    require(
        annotations.is_file(),
        "dataset.root",
        str(root),
        f"a COCO folder with {annotations.relative_to(root)} (see docs/data.md)",
    )
    data = json.loads(annotations.read_text(encoding="utf-8", errors="surrogateescape"))
    captions: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        captions.setdefault(ann["image_id"], []).append(str(ann["caption"]))
    image_dir = root / f"{split}{year}"
    return [  # every listed image; quality.audit skips and counts the missing and broken
        CaptionedImage(image_dir / image["file_name"], tuple(captions.get(image["id"], ())))
        for image in data["images"]
    ]


class CocoDataModule(CaptionedImagesDataModule):
    """train: captions_train<year>; val and test: captions_val<year> (COCO has no public test
    captions; the paper reports on val)."""

    def __init__(self, root: str, year: int = 2017, **kwargs):
        super().__init__(root, **kwargs)
        self.year = year

    def read(self, source: str) -> list[CaptionedImage]:
        return read_coco(self.root, source, self.year)

    def identity(self) -> dict:
        return {"dataset": "coco", "year": self.year, **super().identity()}
