"""Does an image show what its caption says? Pixel analysis of the shapes renderer's flat colours.

No learned model: every pixel is assigned to the nearest palette colour (or to none if it is
far from all of them); each object of the attribute record is then looked for by its colour,
and its bounding box gives its shape (best overlap with the renderer's own shapes redrawn in
that box), its size and its position. Generated images are scored against their captions
with this later (attribute accuracy), so it must be right on rendered images first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from dalle_lightning.data.shapes import BACKGROUND, COLOURS, POSITIONS, SHAPES, SIZES, draw_shape

PALETTE_NAMES = ["background", *COLOURS]
PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)  # (P, 3)
MAX_COLOUR_DISTANCE = 90.0  # RGB distance beyond which a pixel belongs to no palette colour
MIN_AREA = 0.25 * (SIZES["small"] ** 2) * 0.5  # smallest share of the image an object covers
SIZE_THRESHOLD = (SIZES["small"] + SIZES["large"]) / 2  # bounding-box side / image side
RELATION_MARGIN = 0.1  # centres must differ by this share of the image along the stated axis


@dataclass
class CheckResult:
    """`match` is True when every attribute the record states is found in the image."""

    match: bool
    failures: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)  # attribute kind -> times checked
    passed: dict[str, int] = field(default_factory=dict)  # attribute kind -> times it held


def to_uint8(image) -> np.ndarray:
    """A PIL image, a (3, H, W) float tensor in [0, 1] or an (H, W, 3) uint8 array -> (H, W, 3)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        return (
            (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255)
            .round()
            .astype(np.uint8)
        )
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {array.shape}")
    return array.astype(np.uint8)


def palette_labels(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) index into PALETTE_NAMES, or -1 for no palette colour."""
    distance = np.linalg.norm(pixels[:, :, None, :].astype(np.float32) - PALETTE, axis=-1)
    labels = distance.argmin(-1)
    labels[distance.min(-1) > MAX_COLOUR_DISTANCE] = -1
    return labels


def _main_run(counts: np.ndarray) -> tuple[int, int]:
    """The contiguous range of non-empty rows (or columns) around the fullest one."""
    peak = int(counts.argmax())
    lo = hi = peak
    while lo > 0 and counts[lo - 1] > 0:
        lo -= 1
    while hi < len(counts) - 1 and counts[hi + 1] > 0:
        hi += 1
    return lo, hi


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Inclusive (x0, y0, x1, y1) of the main blob of a mask; stray pixels apart are ignored."""
    x0, x1 = _main_run(mask.sum(0))
    y0, y1 = _main_run(mask.sum(1))
    return x0, y0, x1, y1


def classify_shape(mask: np.ndarray, box: tuple[int, int, int, int]) -> str:
    """The renderer's shape whose drawing in `box` overlaps the mask best (IoU)."""
    h, w = mask.shape
    x0, y0, x1, y1 = box
    window = np.zeros_like(mask)
    window[max(y0 - 1, 0) : y1 + 2, max(x0 - 1, 0) : x1 + 2] = True
    target = mask & window
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        canvas = Image.new("1", (w, h), 0)
        draw_shape(ImageDraw.Draw(canvas), shape, box, 1)
        template = np.asarray(canvas, dtype=bool)
        iou = (template & target).sum() / max((template | target).sum(), 1)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def nearest_position(centre: tuple[float, float]) -> str:
    return min(
        POSITIONS,
        key=lambda p: (POSITIONS[p][0] - centre[0]) ** 2 + (POSITIONS[p][1] - centre[1]) ** 2,
    )


def check_attributes(image, record: dict) -> CheckResult:
    """Compare an image with an attribute record from `ShapesDataset` (attributes None: unchecked).

    Checks, per object: colour present, shape, size, position; for two objects their relation;
    and that no colour the record does not mention covers an object's worth of pixels.
    """
    pixels = to_uint8(image)
    size = pixels.shape[0]
    labels = palette_labels(pixels)
    min_pixels = MIN_AREA * size * size
    result = CheckResult(match=True)

    def verdict(kind: str, ok: bool, failure: str) -> None:
        result.checked[kind] = result.checked.get(kind, 0) + 1
        result.passed[kind] = result.passed.get(kind, 0) + int(ok)
        if not ok:
            result.failures.append(failure)

    centres = []
    for i, obj in enumerate(record["objects"]):
        mask = labels == PALETTE_NAMES.index(obj["colour"])
        found = mask.sum() >= min_pixels
        verdict("colour", found, f"object {i}: no {obj['colour']} object")
        if not found:
            centres.append(None)
            for kind in ("shape", "size", "position"):
                if kind == "shape" or obj.get(kind) is not None:
                    verdict(kind, False, f"object {i}: {kind} unknown, colour missing")
            continue
        box = bounding_box(mask)
        x0, y0, x1, y1 = box
        centre = ((x0 + x1 + 1) / 2 / size, (y0 + y1 + 1) / 2 / size)
        centres.append(centre)
        shape = classify_shape(mask, box)
        verdict("shape", shape == obj["shape"], f"object {i}: {shape}, not {obj['shape']}")
        if obj.get("size") is not None:
            found_size = (
                "large" if max(x1 - x0 + 1, y1 - y0 + 1) / size > SIZE_THRESHOLD else "small"
            )
            verdict(
                "size", found_size == obj["size"], f"object {i}: {found_size}, not {obj['size']}"
            )
        if obj.get("position") is not None:
            position = nearest_position(centre)
            verdict(
                "position",
                position == obj["position"],
                f"object {i}: {position}, not {obj['position']}",
            )

    relation = record.get("relation")
    if relation is not None:
        a, b = centres[0], centres[1]
        if a is None or b is None:
            verdict("relation", False, f"relation {relation!r}: an object is missing")
        else:
            axis = 0 if relation in ("left of", "right of") else 1
            sign = -1 if relation in ("left of", "above") else 1
            ok = sign * (a[axis] - b[axis]) > RELATION_MARGIN
            verdict("relation", ok, f"relation {relation!r} does not hold")

    mentioned = {PALETTE_NAMES.index(o["colour"]) for o in record["objects"]}
    for index, name in enumerate(PALETTE_NAMES[1:], start=1):
        if index not in mentioned and (labels == index).sum() >= min_pixels:
            verdict("extra", False, f"an unmentioned {name} object")
    result.match = not result.failures
    return result
