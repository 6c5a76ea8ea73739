"""Bad data: a folder dataset salted with broken files of every kind trains to the end and
reports what it skipped and converted; too much of it stops before any work."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle_lightning.config import ConfigError
from dalle_lightning.data.folder import read_folder
from dalle_lightning.data.quality import BadImage, audit, clean_caption, load_rgb
from dalle_lightning.train import train

MAX_PIXELS = 5000  # the test's decompression-bomb limit: 64x64 images pass, 100x100 do not


def _rgb(path: Path, colour=(200, 30, 30), size=32, fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, format=fmt)


@pytest.fixture
def salted(tmp_path) -> Path:
    """captions.jsonl over 12 good pairs and one of every kind of bad file or caption."""
    root = tmp_path / "salted"
    lines: list[bytes] = []

    def add(image: str, caption) -> None:
        key = "captions" if isinstance(caption, list) else "caption"
        lines.append(json.dumps({"image": image, key: caption}).encode())

    for i in range(3):
        _rgb(root / f"good{i}.png", (40 * i, 100, 200))
        add(f"good{i}.png", f"a good image number {i}")
    # skipped
    add("missing.jpg", "listed, never saved")
    (root / "empty.jpg").write_bytes(b"")
    add("empty.jpg", "zero bytes")
    (root / "garbage.png").write_bytes(np.random.default_rng(0).bytes(3000))
    add("garbage.png", "random bytes")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buffer, "JPEG", quality=95
    )
    (root / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    add("truncated.jpg", "cut in half")
    _rgb(root / "huge.png", size=100)  # 10,000 pixels > MAX_PIXELS
    add("huge.png", "a decompression bomb")
    _rgb(root / "nocaption.png")
    add("nocaption.png", ["", "   "])
    # converted
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    add("cmyk.jpg", "a cmyk jpeg")
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(root / "rgba.png")
    add("rgba.png", "a transparent png")
    Image.new("L", (32, 32), 128).save(root / "grey.png")
    add("grey.png", "a greyscale png")
    Image.fromarray(np.full((32, 32), 65535, np.uint16)).save(root / "deep.png")
    add("deep.png", "a 16-bit png")
    _rgb(root / "long.png")
    add("long.png", "a very long caption " * 200)
    _rgb(root / "latin1.png")
    lines.append(b'{"image": "latin1.png", "caption": "caf\xe9 au lait, not utf-8"}')
    _rgb(root / "oneempty.png")
    add("oneempty.png", ["", "the second caption is fine"])
    for i in range(3, 12):  # the tail: val/test (val_fraction) and more training images
        _rgb(root / f"good{i}.png", (200, 40 * (i - 3), 30))
        add(f"good{i}.png", f"a good image number {i}")
    (root / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


SKIPPED = {
    "empty_file": 1,
    "missing": 1,
    "no_caption": 1,
    "too_large": 1,
    "truncated": 1,
    "unreadable": 1,
}


def test_every_kind_is_skipped_or_converted_and_counted(salted):
    listed = read_folder(salted)
    usable, report = audit(listed, MAX_PIXELS, num_workers=0, what="salted")
    assert report["listed"] == 25 and report["usable"] == 25 - 6
    assert report["skipped"] == SKIPPED
    assert report["converted"] == {
        "16bit": 1,
        "alpha": 1,
        "caption_not_utf8": 1,
        "caption_truncated": 1,
        "cmyk": 1,
        "empty_caption": 3,  # two of nocaption.png, one of oneempty.png
        "greyscale": 1,
    }
    captions = {it.path.name: it.captions for it in usable}
    assert captions["latin1.png"] == ("caf au lait, not utf-8",)
    assert captions["oneempty.png"] == ("the second caption is fine",)
    assert len(captions["long.png"][0]) == 1000


def test_conversions_give_the_right_pixels(salted):
    image, kind = load_rgb(salted / "deep.png", MAX_PIXELS)
    assert kind == "16bit" and image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)
    image, kind = load_rgb(salted / "rgba.png", MAX_PIXELS)  # fully transparent: white
    assert kind == "alpha" and image.getpixel((3, 3)) == (255, 255, 255)
    image, kind = load_rgb(salted / "cmyk.jpg", MAX_PIXELS)  # magenta + yellow ink: red
    red, green, blue = image.getpixel((5, 5))
    assert kind == "cmyk" and red > 200 and green < 40 and blue < 40
    image, kind = load_rgb(salted / "grey.png", MAX_PIXELS)
    assert kind == "greyscale" and image.getpixel((0, 0)) == (128, 128, 128)
    with pytest.raises(BadImage, match="too_large.*100x100"):
        load_rgb(salted / "huge.png", MAX_PIXELS)
    assert clean_caption("  a \t dog  ") == ("a dog", None)
    assert clean_caption("") == (None, "empty_caption")


def _folder_run(root: Path) -> list[str]:
    return [
        "model=dvae",
        "dataset=folder",
        f"dataset.root={root}",
        "dataset.image_size=32",
        "dataset.num_workers=0",
        f"dataset.max_image_pixels={MAX_PIXELS}",
        "trainer.max_steps=6",
    ]


def test_a_salted_folder_trains_to_the_end_and_reports_the_counts(salted, make_cfg):
    cfg = make_cfg(
        [
            *_folder_run(salted),
            "dataset.batch_size=4",
            "dataset.val_fraction=0.2",
            "dataset.max_bad_fraction=0.5",
            "model.net.n_hid=8",
            "model.net.n_init=8",
            "model.net.vocab_size=32",
            "trainer.val_check_interval=3",
        ]
    )
    _, summary = train(cfg)
    assert summary["global_step"] == 6
    data = summary["data"]
    assert data["train"]["skipped"] == SKIPPED  # every bad file sits in the training part
    assert data["train"]["converted"]["cmyk"] == 1 and data["val"]["skipped"] == {}
    assert data["train"]["usable"] + data["val"]["usable"] == 19
    written = json.loads(Path(cfg.paths.output_dir, "metrics.json").read_text())
    assert written["data"] == data


def test_too_many_bad_files_stop_before_any_work(salted, make_cfg):
    cfg = make_cfg(_folder_run(salted))
    with pytest.raises(ConfigError, match=r"dataset.max_bad_fraction=0.1 .* 6 of 2\d listed"):
        train(cfg)
    assert not list(Path(cfg.paths.output_dir).rglob("*.ckpt"))
