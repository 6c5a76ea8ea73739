"""CUB-200-2011 with the captions of Reed et al. (2016), in their released layouts:

    <root>/images.txt                   "<image id> <class dir>/<name>.jpg"
    <root>/train_test_split.txt         "<image id> <1 train | 0 test>"   (the official split)
    <root>/images/<class dir>/<name>.jpg
    <root>/text_c10/<class dir>/<name>.txt   10 captions, one per line

`class_split="text_to_image"` (default) is the split text-to-image papers use: the first 150
classes (ids 001-150) train, the last 50 test, so test birds are species never seen in
training. `class_split="official"` uses train_test_split.txt instead.
"""

from __future__ import annotations

from pathlib import Path

from dalle_lightning.config import require
from dalle_lightning.data.captioned_images import CaptionedImage, CaptionedImagesDataModule

CUB_SPLITS = ("train", "test")
CLASS_SPLITS = ("text_to_image", "official")
TRAIN_CLASSES = 150


def _pairs(path: Path) -> list[tuple[str, str]]:
    return [tuple(line.split(maxsplit=1)) for line in path.read_text().splitlines() if line]


def read_cub(
    root: str | Path, split: str, class_split: str = "text_to_image"
) -> list[CaptionedImage]:
    """The images of `split` that exist on disk and have captions, in images.txt order."""
    require(split in CUB_SPLITS, "dataset.split", split, "train or test")
    require(
        class_split in CLASS_SPLITS, "dataset.class_split", class_split, "text_to_image or official"
    )
    root = Path(root)
    for needed in ("images.txt", "train_test_split.txt", "images", "text_c10"):
        require(
            (root / needed).exists(),
            "dataset.root",
            str(root),
            f"a CUB_200_2011 folder with {needed} (text_c10: Reed et al.'s captions; docs/data.md)",
        )
    is_train = {i: flag == "1" for i, flag in _pairs(root / "train_test_split.txt")}
    items = []
    for image_id, relative in _pairs(root / "images.txt"):
        class_dir = relative.split("/")[0]
        if class_split == "official":
            in_train = is_train[image_id]
        else:  # class dirs are "001.Black_footed_Albatross" ... "200.Common_Yellowthroat"
            in_train = int(class_dir.split(".")[0]) <= TRAIN_CLASSES
        if in_train != (split == "train"):
            continue
        text = root / "text_c10" / Path(relative).with_suffix(".txt")
        # raw lines: quality.audit drops empty ones and counts images left without any
        read = text.read_text(encoding="utf-8", errors="surrogateescape") if text.is_file() else ""
        items.append(CaptionedImage(root / "images" / relative, tuple(read.splitlines())))
    return items


class CubDataModule(CaptionedImagesDataModule):
    """train: the training classes; val and test: the test classes (`class_split`)."""

    eval_source = "test"

    def __init__(self, root: str, class_split: str = "text_to_image", **kwargs):
        super().__init__(root, **kwargs)
        self.class_split = class_split

    def read(self, source: str) -> list[CaptionedImage]:
        return read_cub(self.root, source, self.class_split)

    def identity(self) -> dict:
        return {"dataset": "cub", "class_split": self.class_split, **super().identity()}
