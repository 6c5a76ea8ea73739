"""LightningDataModules over images on disk: `dataset=coco`, `dataset=cub`, `dataset=folder`.

Every split is a `CaptionedImages` list read by `coco.py`, `cub.py` or `folder.py`. The
training split goes through the paper's preprocessing (`train_transform`: `dvae` = Listing
1 for stage 1, `prior` = Listing 2, `eval` = resize + centre crop); val and test always
through the deterministic `eval` transform. The token cache of stage 2 encodes every split
at the `eval` transform (`cache_dataset`) and keeps all captions of an image.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from dalle_lightning.config import require, require_choice, require_float, require_int
from dalle_lightning.data.captioned_images import MAX_IMAGE_PIXELS, CaptionedImage, CaptionedImages
from dalle_lightning.data.coco import read_coco
from dalle_lightning.data.cub import read_cub
from dalle_lightning.data.datamodule import ImageTextDataModule
from dalle_lightning.data.folder import read_folder
from dalle_lightning.data.quality import audit, check_bad_fraction
from dalle_lightning.data.transforms import DVAETransform, EvalTransform, PriorTransform

TRANSFORMS = {"dvae": DVAETransform, "prior": PriorTransform, "eval": EvalTransform}


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
        require(Path(root).is_dir(), "dataset.root", root, "an existing folder (README: Datasets)")
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
