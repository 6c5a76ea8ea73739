"""Loaders of images on disk: COCO on the real files in ../shared/assets/coco_mini, CUB on a
fixture in its real layout built here, and a folder with captions.jsonl."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from dalle_lightning.config import ConfigError
from dalle_lightning.data.coco import CocoDataModule, read_coco
from dalle_lightning.data.cub import CubDataModule, read_cub
from dalle_lightning.data.folder import FolderDataModule, read_folder
from dalle_lightning.data.quality import audit
from dalle_lightning.data.token_cache import encode_dataset
from dalle_lightning.data.token_datamodule import TokenDataModule, TokenDataset
from dalle_lightning.instantiate import build
from dalle_lightning.models.dvae import DVAE, DVAEConfig
from dalle_lightning.text.tokenizer import BPETokenizer, TextConfig

# the real COCO files of ../shared/assets (see its README), found beside any parent folder
COCO_MINI = next(
    (
        p / "shared" / "assets" / "coco_mini"
        for p in Path(__file__).resolve().parents
        if (p / "shared" / "assets" / "coco_mini").is_dir()
    ),
    Path("shared/assets/coco_mini"),
)
needs_coco = pytest.mark.skipif(not COCO_MINI.is_dir(), reason="shared/assets/coco_mini not found")


@needs_coco
def test_coco_val2017_keeps_the_images_on_disk_and_reports_the_missing_once(caplog):
    listed = read_coco(COCO_MINI, "val", 2017)
    assert len(listed) == 5000
    with caplog.at_level(logging.WARNING):
        items, report = audit(listed, max_pixels=10**8, num_workers=0, what="coco val")
    on_disk = {p.name for p in (COCO_MINI / "val2017").glob("*.jpg")}
    assert len(items) == len(on_disk) == 159
    assert {it.path.name for it in items} == on_disk
    assert all(len(it.captions) >= 5 for it in items)
    warnings = [r.getMessage() for r in caplog.records if "missing" in r.getMessage()]
    assert len(warnings) == 1 and "4841 of 5000" in warnings[0]
    assert report["skipped"] == {"missing": 4841} and report["converted"] == {"greyscale": 1}
    # far more than 10% missing: a datamodule stops unless told to train on the rest
    with pytest.raises(ConfigError, match=r"max_bad_fraction=0.1 .*4841 of 5000 .*missing 4841"):
        CocoDataModule(str(COCO_MINI), image_size=64, num_workers=0).setup()
    # the captions belong to their image (checked against the JSON by hand for one image)
    data = json.loads((COCO_MINI / "annotations" / "captions_val2017.json").read_text())
    first = items[0]
    image_id = next(im["id"] for im in data["images"] if im["file_name"] == first.path.name)
    expected = [a["caption"].strip() for a in data["annotations"] if a["image_id"] == image_id]
    assert list(first.captions) == expected


@needs_coco
def test_coco_datamodule_gives_rgb_crops_and_a_caption_of_the_image(caplog):
    dm = CocoDataModule(
        str(COCO_MINI), image_size=64, eval_batch_size=32, num_workers=0, max_bad_fraction=1.0
    )
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert len(dm.datasets["train"]) == 80 and len(dm.datasets["val"]) == 159
    assert len(dm.datasets["test"]) == 159  # COCO's val serves val and test ...
    assert sum("missing" in r.getMessage() for r in caplog.records) == 1  # ... read once
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (32, 3, 64, 64)
    assert batch["image"].min() >= 0 and batch["image"].max() <= 1
    val = dm.datasets["val"]
    assert all(val[i]["caption"] == val.items[i].captions[0] for i in range(3))
    # every image converts to RGB, the greyscale one included
    for i in range(len(val)):
        assert val[i]["image"].shape == (3, 64, 64)


def test_coco_without_the_captions_file_names_the_root(tmp_path):
    with pytest.raises(ConfigError, match="dataset.root.*captions_val2017.json"):
        read_coco(tmp_path, "val", 2017)
    with pytest.raises(ConfigError, match="dataset.year"):
        read_coco(tmp_path, "val", 2015)


def _jpeg(path: Path, colour=(200, 30, 30), size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def cub(tmp_path) -> Path:
    """Four classes in the real CUB_200_2011 layout: 001, 002, 151, 152; two images each.
    One image of class 152 has no file on disk; one of class 001 is official-test."""
    root = tmp_path / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "151.Black_capped_Vireo",
               "152.Blue_headed_Vireo"]  # fmt: skip
    images, split = [], []
    n = 0
    for c in classes:
        for k in range(2):
            n += 1
            rel = f"{c}/{c.split('.')[1]}_{k}.jpg"
            images.append(f"{n} {rel}")
            split.append(f"{n} {0 if (c.startswith('001') and k == 1) else 1}")
            if not (c.startswith("152") and k == 1):
                _jpeg(root / "images" / rel)
            text = root / "text_c10" / Path(rel).with_suffix(".txt")
            text.parent.mkdir(parents=True, exist_ok=True)
            text.write_text("\n".join(f"{c} bird {k} caption {j}" for j in range(10)) + "\n")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{i + 1} {c}" for i, c in enumerate(classes)))
    return root


def test_cub_text_to_image_split_is_by_class_and_has_ten_captions(cub):
    train = read_cub(cub, "train")
    listed = read_cub(cub, "test")
    test, report = audit(listed, max_pixels=10**6, num_workers=0, what="cub test")
    assert {it.path.parent.name[:3] for it in train} == {"001", "002"}
    assert {it.path.parent.name[:3] for it in test} == {"151", "152"}
    assert len(train) == 4 and len(listed) == 4 and len(test) == 3  # a 152 image is missing
    assert report["skipped"] == {"missing": 1}
    assert all(len(it.captions) == 10 for it in train + test)
    assert train[0].captions[3] == "001.Black_footed_Albatross bird 0 caption 3"


def test_cub_official_split_follows_train_test_split_txt(cub):
    test = read_cub(cub, "test", class_split="official")
    assert [it.path.name for it in test] == ["Black_footed_Albatross_1.jpg"]
    train = read_cub(cub, "train", class_split="official")
    assert len(audit(train, max_pixels=10**6, num_workers=0, what="cub train")[0]) == 6


def test_cub_datamodule_draws_a_caption_of_the_image_in_training(cub):
    dm = CubDataModule(str(cub), image_size=32, num_workers=0, max_bad_fraction=0.5)
    dm.setup()
    item = dm.datasets["train"][0]
    assert item["image"].shape == (3, 32, 32)
    assert item["caption"] in dm.datasets["train"].items[0].captions
    torch.manual_seed(0)
    drawn = {dm.datasets["train"][0]["caption"] for _ in range(30)}
    assert len(drawn) > 1  # random caption per access in training, first in eval
    assert {dm.datasets["test"][0]["caption"] for _ in range(5)} == {
        dm.datasets["test"].items[0].captions[0]
    }


@pytest.fixture
def folder(tmp_path) -> Path:
    _jpeg(tmp_path / "a.jpg")
    _jpeg(tmp_path / "sub" / "b.png", (10, 200, 10))
    _jpeg(tmp_path / "c.jpg", (10, 10, 200))
    lines = [
        {"image": "a.jpg", "caption": "a red thing"},
        {"image": "sub/b.png", "captions": ["a green thing", "green"]},
        {"image": "gone.jpg", "caption": "not on disk"},
        {"image": "c.jpg", "caption": "a blue thing"},
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return tmp_path


def test_folder_reads_both_caption_forms_and_skips_missing(folder):
    listed = read_folder(folder)
    assert [it.path.name for it in listed] == ["a.jpg", "b.png", "gone.jpg", "c.jpg"]
    items, report = audit(listed, max_pixels=10**6, num_workers=0, what="folder")
    assert [it.path.name for it in items] == ["a.jpg", "b.png", "c.jpg"]
    assert items[1].captions == ("a green thing", "green")
    assert report == {"listed": 4, "usable": 3, "skipped": {"missing": 1}, "converted": {}}


def test_folder_bad_line_names_file_and_line(folder):
    with open(folder / "captions.jsonl", "a") as f:
        f.write('{"img": "x.jpg"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:5: expected"):
        read_folder(folder)


def test_folder_datamodule_splits_train_and_val(folder):
    dm = FolderDataModule(
        str(folder), image_size=16, val_fraction=0.3, num_workers=0, max_bad_fraction=0.5
    )
    dm.setup()
    assert len(dm.datasets["train"]) == 2 and len(dm.datasets["val"]) == 1
    with pytest.raises(ConfigError, match="dataset.root"):
        FolderDataModule(str(folder / "nope"))


def test_token_cache_keeps_every_caption_and_training_draws_among_them(folder):
    dm = FolderDataModule(
        str(folder), image_size=16, val_fraction=0.3, num_workers=0, max_bad_fraction=0.5
    )
    dvae = DVAE(DVAEConfig(image_size=16, vocab_size=8, n_hid=8, n_init=8, group_count=2))
    tokens = encode_dataset(dvae, dm.cache_dataset("train"))
    assert tokens["codes"].shape == (2, 8, 8)
    assert tokens["captions"] == ["a red thing", "a green thing"]
    assert tokens["all_captions"] == [["a red thing"], ["a green thing", "green"]]
    tokenizer = BPETokenizer.train(["a red thing", "a green thing", "green"], 40, 8)
    torch.manual_seed(0)
    training = TokenDataset(tokens, tokenizer, random_caption=True)
    drawn = {training[1]["caption"] for _ in range(20)}
    assert drawn == {"a green thing", "green"}
    item = TokenDataset(tokens, tokenizer)[1]
    assert item["caption"] == "a green thing"
    assert torch.equal(item["text"], tokenizer.encode(["a green thing"])[0])


@pytest.mark.parametrize("option", ["coco", "cub", "folder"])
def test_dataset_configs_build_and_a_wrong_root_names_the_field(make_cfg, option, tmp_path):
    cfg = make_cfg([f"dataset={option}", f"dataset.root={tmp_path / 'absent'}"])
    with pytest.raises(ConfigError, match=r"^dataset.root=.*absent.*docs/data.md"):
        build(cfg.dataset, "dataset")
    cfg = make_cfg([f"dataset={option}", f"dataset.root={tmp_path}"])
    assert build(cfg.dataset, "dataset").image_size == 256


def test_val_and_test_of_one_source_share_one_token_cache(folder, tmp_path):
    dm = FolderDataModule(
        str(folder), image_size=16, val_fraction=0.3, num_workers=0, max_bad_fraction=0.5
    )
    dvae = DVAE(DVAEConfig(image_size=16, vocab_size=8, n_hid=8, n_init=8, group_count=2))
    tokens = TokenDataModule(dm, dvae, "sha", str(tmp_path / "cache"), TextConfig(64, 8))
    assert tokens.split_tokens("test") is tokens.split_tokens("val")  # encoded once
    assert tokens.split_tokens("train") is not tokens.split_tokens("val")
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").glob("*.pt")) == [
        "train",
        "val",
    ]  # no separate test file
