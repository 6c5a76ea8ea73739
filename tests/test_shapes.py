"""The built-in shapes data: deterministic, captioned, with a held-out split of unseen pairs."""

from __future__ import annotations

import pytest
import torch

from dalle_lightning.config import ConfigError
from dalle_lightning.data.shapes import (
    COLOURS,
    POSITION_PHRASES,
    SHAPES,
    ShapesConfig,
    ShapesDataModule,
    ShapesDataset,
    all_pairs,
    heldout_pairs,
)


def test_vocabulary_is_rich_enough():
    assert len(SHAPES) >= 4 and len(COLOURS) >= 6


def test_items_are_deterministic_from_seed_split_and_index():
    a = ShapesDataset(ShapesConfig(seed=3), "train", 100)
    b = ShapesDataset(ShapesConfig(seed=3), "train", 100)
    for i in (57, 3, 57):  # any order, any instance
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"])
        assert x["caption"] == y["caption"] and x["record"] == y["record"]
    other_seed = ShapesDataset(ShapesConfig(seed=4), "train", 100)
    other_split = ShapesDataset(ShapesConfig(seed=3), "val", 100)
    assert any(not torch.equal(a[i]["image"], other_seed[i]["image"]) for i in range(5))
    assert any(not torch.equal(a[i]["image"], other_split[i]["image"]) for i in range(5))


def test_item_format_and_caption_match_record():
    ds = ShapesDataset(ShapesConfig(), "train", 300)
    n_objects = set()
    for i in range(300):
        item = ds[i]
        image, caption, record = item["image"], item["caption"], item["record"]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert image.min() >= 0 and image.max() <= 1
        n_objects.add(len(record["objects"]))
        for obj in record["objects"]:
            assert f"{obj['colour']} {obj['shape']}" in caption
            if obj["size"] is not None:
                assert f"{obj['size']} {obj['colour']}" in caption
            if obj["position"] is not None:
                assert POSITION_PHRASES[obj["position"]] in caption
        if record["relation"] is not None:
            assert len(record["objects"]) == 2
    assert n_objects == {1, 2}


def test_captions_use_several_templates_and_all_relations():
    captions = [ShapesDataset(ShapesConfig(), "train", 400)[i]["caption"] for i in range(400)]
    assert any(c.startswith("a picture of") for c in captions)
    assert any(c.startswith("on the") or c.startswith("at the") for c in captions)
    for phrase in ("to the left of", "to the right of", " above ", " below "):
        assert any(phrase in c for c in captions), phrase


def test_heldout_pairs_never_appear_in_train_and_always_in_heldout():
    cfg = ShapesConfig(heldout_fraction=0.15)
    held = set(heldout_pairs(cfg.seed, cfg.heldout_fraction))
    assert len(held) == round(0.15 * len(all_pairs()))
    # every colour and every shape is still seen in train
    seen = set(all_pairs()) - held
    assert {c for c, _ in seen} == set(COLOURS) and {s for _, s in seen} == set(SHAPES)
    for split in ("train", "val", "test"):
        ds = ShapesDataset(cfg, split, 1000)
        for i in range(1000):
            pairs = {(o["colour"], o["shape"]) for o in ds[i]["record"]["objects"]}
            assert not pairs & held, (split, i, pairs)
    ds = ShapesDataset(cfg, "heldout", 200)
    for i in range(200):
        pairs = {(o["colour"], o["shape"]) for o in ds[i]["record"]["objects"]}
        assert pairs & held


def test_256_pixels_work():
    item = ShapesDataset(ShapesConfig(image_size=256), "val", 4)[0]
    assert item["image"].shape == (3, 256, 256)
    assert item["image"].sum() > 0


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match=r"^image_size=16 is invalid"):
        ShapesConfig(image_size=16)
    with pytest.raises(ConfigError, match=r"^heldout_fraction=0.9 is invalid"):
        ShapesConfig(heldout_fraction=0.9)
    with pytest.raises(ConfigError, match=r"^split='dev' is invalid: one of train, val"):
        ShapesDataset(ShapesConfig(), "dev", 10)


def test_datamodule_batches():
    dm = ShapesDataModule(num_train=64, num_val=16, num_test=16, num_heldout=16, batch_size=8)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 64, 64)
    assert len(batch["caption"]) == 8 and len(batch["record"]) == 8
    assert len(list(dm.split_dataloader("heldout"))) == 2  # 16 items, eval batch = batch size 8
