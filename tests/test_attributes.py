"""The attribute checker agrees with the renderer and rejects wrong colours, shapes, positions."""

from __future__ import annotations

import copy
import random

import torch

from dalle_lightning.data.shapes import COLOURS, POSITIONS, SHAPES, ShapesConfig, ShapesDataset
from dalle_lightning.evaluation.attribute_checker import check_attributes


def _items(split: str, n: int, size: int = 64):
    ds = ShapesDataset(ShapesConfig(image_size=size), split, n)
    return [ds[i] for i in range(n)]


def test_agrees_with_rendered_images_at_64px():
    items = _items("train", 400) + _items("heldout", 100)
    agree = sum(check_attributes(it["image"], it["record"]).match for it in items)
    assert agree / len(items) >= 0.99, agree


def test_agrees_at_256px():
    items = _items("val", 30, size=256)
    assert all(check_attributes(it["image"], it["record"]).match for it in items)


def test_tolerates_pixel_noise():
    torch.manual_seed(0)
    items = _items("val", 200)
    agree = 0
    for it in items:
        noisy = (it["image"] + 0.04 * torch.randn_like(it["image"])).clamp(0, 1)
        agree += check_attributes(noisy, it["record"]).match
    assert agree / len(items) >= 0.97, agree


def test_rejects_wrong_colour_shape_and_position():
    rng = random.Random(0)
    items = _items("val", 200)
    accepted = {"colour": 0, "shape": 0, "position": 0}
    n_position = 0
    for it in items:
        used = {o["colour"] for o in it["record"]["objects"]}
        record = copy.deepcopy(it["record"])
        record["objects"][0]["colour"] = rng.choice([c for c in COLOURS if c not in used])
        accepted["colour"] += check_attributes(it["image"], record).match
        record = copy.deepcopy(it["record"])
        obj = record["objects"][0]
        obj["shape"] = rng.choice([s for s in SHAPES if s != obj["shape"]])
        accepted["shape"] += check_attributes(it["image"], record).match
        if obj["position"] is not None:
            n_position += 1
            record = copy.deepcopy(it["record"])
            obj = record["objects"][0]
            obj["position"] = rng.choice([p for p in POSITIONS if p != obj["position"]])
            accepted["position"] += check_attributes(it["image"], record).match
    assert n_position > 50
    assert accepted == {"colour": 0, "shape": 0, "position": 0}


def test_rejects_swapped_relation_and_blank_image():
    items = [it for it in _items("val", 100) if it["record"]["relation"] is not None]
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    for it in items:
        record = copy.deepcopy(it["record"])
        record["relation"] = opposite[record["relation"]]
        result = check_attributes(it["image"], record)
        assert not result.match and any("relation" in f for f in result.failures)
    blank = check_attributes(torch.zeros(3, 64, 64), items[0]["record"])
    assert not blank.match and blank.passed.get("colour", 0) == 0


def test_rejects_an_extra_object():
    item = next(it for it in _items("val", 50) if len(it["record"]["objects"]) == 2)
    record = copy.deepcopy(item["record"])
    record["objects"] = record["objects"][:1]
    record["relation"] = None
    result = check_attributes(item["image"], record)
    assert not result.match and any("unmentioned" in f for f in result.failures)
