"""Built-in captioned shapes (`dataset=shapes`): images rendered on the fly, deterministic from
(seed, split, index), and their datamodule.

One or two flat-coloured shapes on a black background, with a caption from several templates
("a large red circle on the left", "a small blue square above a green triangle") and an
attribute record: the caption's content in structured form, which
`evaluation/attribute_checker.py` checks
against any image (rendered or generated). Attributes the caption leaves out are None in the
record (a caption without a size says nothing about size).

The `heldout` split holds images with (colour, shape) pairs that never occur in train,
val or test: the compositional generalisation probe.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from dalle_lightning.config import require, require_float, require_int
from dalle_lightning.data.datamodule import ImageTextDataModule

BACKGROUND = (0, 0, 0)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.22, "large": 0.38}  # side of the bounding box as a fraction of the image
POSITIONS = {  # centre of the object as a fraction of the image (x, y)
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
# relation of the first-mentioned object to the second, and where each object's centre goes
RELATIONS = {
    "left of": ("to the left of", (0.25, None), (0.75, None)),
    "right of": ("to the right of", (0.75, None), (0.25, None)),
    "above": ("above", (None, 0.25), (None, 0.75)),
    "below": ("below", (None, 0.75), (None, 0.25)),
}
SPLITS = ("train", "val", "test", "heldout")
JITTER = 0.04  # random offset of an object's centre along its stated axis, fraction of image


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    """Fill `shape` inside the inclusive pixel box (x0, y0, x1, y1), without anti-aliasing."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":  # pointing up
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def all_pairs() -> list[tuple[str, str]]:
    return list(itertools.product(COLOURS, SHAPES))


def heldout_pairs(seed: int, fraction: float) -> list[tuple[str, str]]:
    """(colour, shape) pairs never rendered in train; every colour and shape stays in train."""
    pairs = all_pairs()
    order = np.random.default_rng([seed, 7919]).permutation(len(pairs))
    n_target = round(fraction * len(pairs))
    held: list[tuple[str, str]] = []
    for i in order:
        if len(held) == n_target:
            break
        colour, shape = pairs[i]
        left = [p for p in pairs if p not in held and p != (colour, shape)]
        if any(c == colour for c, _ in left) and any(s == shape for _, s in left):
            held.append((colour, shape))
    return sorted(held)


@dataclass(frozen=True)
class ShapesConfig:
    image_size: int = 64
    seed: int = 0
    heldout_fraction: float = 0.15
    two_object_prob: float = 0.5
    size_mention_prob: float = 0.7  # how often a caption states the size of each object

    def __post_init__(self) -> None:
        require_int("image_size", self.image_size, 32)
        require_int("seed", self.seed, 0)
        require_float("heldout_fraction", self.heldout_fraction, 0.0, 0.5)
        require_float("two_object_prob", self.two_object_prob, 0.0, 1.0)
        require_float("size_mention_prob", self.size_mention_prob, 0.0, 1.0)


def _describe(obj: dict) -> str:
    size = f"{obj['size']} " if obj["size"] else ""
    return f"{size}{obj['colour']} {obj['shape']}"


class ShapesDataset(Dataset):
    """`length` items of one split; item i is the same on every machine and every call.

    Item: {"image": float tensor (3, S, S) in [0, 1], "caption": str, "record": dict}.
    """

    def __init__(self, config: ShapesConfig, split: str, length: int):
        require(split in SPLITS, "split", split, "one of " + ", ".join(SPLITS))
        require_int("length", length, 1)
        self.config, self.split, self.length = config, split, length
        held = set(heldout_pairs(config.seed, config.heldout_fraction))
        seen = [p for p in all_pairs() if p not in held]
        # heldout images contain at least one held-out pair (the first object)
        self.first_pairs = sorted(held) if split == "heldout" else seen
        self.other_pairs = all_pairs() if split == "heldout" else seen
        require(
            len(self.first_pairs) > 0,
            "heldout_fraction",
            config.heldout_fraction,
            "large enough to hold out at least one (colour, shape) pair",
        )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        image, caption, record = self.render(index)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
        return {"image": pixels, "caption": caption, "record": record}

    def captions_of(self, index: int) -> list[str]:
        """Every caption of item `index` (one here; COCO images have five)."""
        return [self.render(index)[1]]

    def render(self, index: int) -> tuple[Image.Image, str, dict]:
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, SPLITS.index(self.split), index])
        n_objects = 2 if rng.random() < cfg.two_object_prob else 1
        colour, shape = self.first_pairs[rng.integers(len(self.first_pairs))]
        objects = [self._object(rng, colour, shape)]
        if n_objects == 2:
            others = [p for p in self.other_pairs if p[0] != colour]  # colours stay distinct
            colour2, shape2 = others[rng.integers(len(others))]
            objects.append(self._object(rng, colour2, shape2))
            if rng.random() < 0.5:  # the held-out pair is not always mentioned first
                objects.reverse()
            relation = list(RELATIONS)[rng.integers(len(RELATIONS))]
            _, anchor_a, anchor_b = RELATIONS[relation]
            centres = [self._centre(rng, anchor_a), self._centre(rng, anchor_b)]
            caption = (
                f"a {_describe(objects[0])} {RELATIONS[relation][0]} a {_describe(objects[1])}"
            )
            if rng.random() < 0.3:
                caption = "there is " + caption
        else:
            relation = None
            position = list(POSITIONS)[rng.integers(len(POSITIONS))]
            objects[0]["position"] = position
            cx, cy = POSITIONS[position]
            centres = [(cx + rng.uniform(-JITTER, JITTER), cy + rng.uniform(-JITTER, JITTER))]
            template = rng.integers(3)
            desc, where = _describe(objects[0]), POSITION_PHRASES[position]
            caption = (
                f"a {desc} {where}",
                f"{where} there is a {desc}",
                f"a picture of a {desc} {where}",
            )[template]

        S = cfg.image_size
        image = Image.new("RGB", (S, S), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for obj, (cx, cy) in zip(objects, centres, strict=True):
            side = round(SIZES[obj.pop("true_size")] * S)
            x0, y0 = round(cx * S - side / 2), round(cy * S - side / 2)
            obj["box"] = [x0, y0, x0 + side - 1, y0 + side - 1]
            draw_shape(draw, obj["shape"], tuple(obj["box"]), COLOURS[obj["colour"]])
        return image, caption, {"objects": objects, "relation": relation}

    def _object(self, rng: np.random.Generator, colour: str, shape: str) -> dict:
        size = list(SIZES)[rng.integers(len(SIZES))]
        mention = rng.random() < self.config.size_mention_prob
        return {
            "colour": colour,
            "shape": shape,
            "size": size if mention else None,
            "position": None,
            "true_size": size,
        }

    @staticmethod
    def _centre(rng: np.random.Generator, anchor: tuple) -> tuple[float, float]:
        """Jittered centre on the stated axis, free in [0.3, 0.7] on the other."""
        return tuple(
            a + rng.uniform(-JITTER, JITTER) if a is not None else rng.uniform(0.3, 0.7)
            for a in anchor
        )


_DESC = r"(?:(?P<size{i}>{sizes}) )?(?P<colour{i}>{colours}) (?P<shape{i}>{shapes})"


def _desc(i: int) -> str:
    alt = "|".join
    return _DESC.format(i=i, sizes=alt(SIZES), colours=alt(COLOURS), shapes=alt(SHAPES))


_WHERE = "(?P<where>" + "|".join(POSITION_PHRASES.values()) + ")"
_RELATION = "(?P<relation>" + "|".join(phrase for phrase, _, _ in RELATIONS.values()) + ")"
CAPTION_PATTERNS = [  # the renderer's templates, in `ShapesDataset.render`'s order
    re.compile(f"(?:there is )?a {_desc(0)} {_RELATION} a {_desc(1)}"),
    re.compile(f"a {_desc(0)} {_WHERE}"),
    re.compile(f"{_WHERE} there is a {_desc(0)}"),
    re.compile(f"a picture of a {_desc(0)} {_WHERE}"),
]


def parse_caption(caption: str) -> dict | None:
    """The attribute record of a caption in the renderer's grammar ("a small red circle on the
    left", "a blue square above a green triangle"), as `render` makes it without the boxes; None
    for any other text. Case, surrounding spaces and a final full stop are ignored."""
    text = " ".join(caption.lower().split()).rstrip(".").strip()
    for pattern in CAPTION_PATTERNS:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        found = match.groupdict()
        n_objects = 2 if found.get("relation") else 1
        objects = [
            {
                "colour": found[f"colour{i}"],
                "shape": found[f"shape{i}"],
                "size": found[f"size{i}"],
                "position": None,
            }
            for i in range(n_objects)
        ]
        if n_objects == 2:
            if objects[0]["colour"] == objects[1]["colour"]:
                return None  # the checker tells objects apart by colour
            phrases = {phrase: name for name, (phrase, _, _) in RELATIONS.items()}
            return {"objects": objects, "relation": phrases[found["relation"]]}
        positions = {phrase: name for name, phrase in POSITION_PHRASES.items()}
        objects[0]["position"] = positions[found["where"]]
        return {"objects": objects, "relation": None}
    return None


class ShapesDataModule(ImageTextDataModule):
    """The built-in captioned shapes (no files, no download): one `ShapesDataset` per split."""

    def __init__(
        self,
        image_size: int = 64,
        seed: int = 0,
        heldout_fraction: float = 0.15,
        two_object_prob: float = 0.5,
        size_mention_prob: float = 0.7,
        num_train: int = 50_000,
        num_val: int = 512,
        num_test: int = 512,
        num_heldout: int = 512,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
    ):
        super().__init__(batch_size, eval_batch_size, num_workers)
        self.config = ShapesConfig(
            image_size, seed, heldout_fraction, two_object_prob, size_mention_prob
        )
        self.lengths = {
            "train": num_train,
            "val": num_val,
            "test": num_test,
            "heldout": num_heldout,
        }
        for split, n in self.lengths.items():
            require_int(f"num_{split}", n, 1)

    def identity(self) -> dict:
        return {"dataset": "shapes", **asdict(self.config), "lengths": self.lengths}

    def build_datasets(self) -> dict[str, Dataset]:
        return {split: ShapesDataset(self.config, split, n) for split, n in self.lengths.items()}
