"""A damaged token-cache, tokenizer or evaluation-pool file (a byte flipped by a bad disk, a
file cut short by a killed writer) is detected on load, reported and rebuilt: never used
silently."""

from __future__ import annotations

import logging

import pytest
import torch

from dalle_lightning.data.token_cache import load_or_encode, load_or_train_tokenizer
from dalle_lightning.evaluation.candidates import candidate_paths, generate_pool, write_real_images
from dalle_lightning.models.dvae import DVAE, DVAEConfig
from dalle_lightning.sampling.sampler import SamplingConfig
from tests.test_file_locks import CAPTIONS, SlowImages, SlowModel


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_token_cache_is_rebuilt(tmp_path, caplog, how):
    torch.manual_seed(0)
    dvae = DVAE(DVAEConfig(image_size=32, n_hid=8, n_init=8, vocab_size=32))
    build = lambda: load_or_encode(dvae, "sha", {"d": 1}, SlowImages(), "train", tmp_path)  # noqa: E731
    first = build()
    (path,) = tmp_path.glob("train-*.pt")
    assert path.with_name(path.name + ".sha256").is_file()
    _damage(path, how)
    with caplog.at_level(logging.INFO):
        again = build()
    assert f"cache file {path} is corrupt" in caplog.text
    assert "encoding" in caplog.text  # rebuilt, not read
    assert torch.equal(again["codes"], first["codes"])
    caplog.clear()
    with caplog.at_level(logging.INFO):
        build()
    assert "corrupt" not in caplog.text and "encoding" not in caplog.text  # whole again


def test_a_damaged_tokenizer_file_is_relearned(tmp_path, caplog):
    first = load_or_train_tokenizer(CAPTIONS, {"d": 1}, 64, 8, tmp_path)
    (path,) = tmp_path.glob("tokenizer-*.json")
    _damage(path, "truncate")
    with caplog.at_level(logging.INFO):
        again = load_or_train_tokenizer(CAPTIONS, {"d": 1}, 64, 8, tmp_path)
    assert "is corrupt" in caplog.text and " ids learned " in caplog.text
    assert again.tokenizer.get_vocab_size() == first.tokenizer.get_vocab_size()


def test_a_cache_file_from_before_checksums_is_adopted(tmp_path, caplog):
    torch.manual_seed(0)
    dvae = DVAE(DVAEConfig(image_size=32, n_hid=8, n_init=8, vocab_size=32))
    load_or_encode(dvae, "sha", {"d": 1}, SlowImages(), "train", tmp_path)
    (sums,) = tmp_path.glob("train-*.pt.sha256")
    sums.unlink()  # what an older version wrote: the file alone
    with caplog.at_level(logging.INFO):
        load_or_encode(dvae, "sha", {"d": 1}, SlowImages(), "train", tmp_path)
    assert "encoding" not in caplog.text and sums.is_file()


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_evaluation_pool_png_is_made_again(tmp_path, caplog, how):
    """6 captions x 2 candidates in chunks of 2 captions: a damaged PNG's chunk alone is
    generated again (same seed: the same bytes), with one warning naming the file."""
    captions = [f"caption {i}" for i in range(6)]
    make = lambda: generate_pool(  # noqa: E731
        SlowModel(), captions, 2, tmp_path, 0, "val", SamplingConfig(), 4
    )
    assert make() == {"generated": 12, "reused": 0}
    paths = [p for row in candidate_paths(tmp_path, 6, 2) for p in row]
    original = [p.read_bytes() for p in paths]
    _damage(paths[5], how)  # caption 2: the second chunk
    with caplog.at_level(logging.WARNING):
        assert make() == {"generated": 4, "reused": 8}
    assert f"{paths[5]} is corrupt" in caplog.text
    assert [p.read_bytes() for p in paths] == original
    caplog.clear()
    assert make() == {"generated": 0, "reused": 12} and "corrupt" not in caplog.text


def test_damaged_real_images_are_written_again(tmp_path, caplog):
    dataset = [{"image": torch.full((3, 8, 8), i / 10)} for i in range(4)]
    pairs = [(0, "a"), (2, "b"), (3, "c")]
    assert write_real_images(dataset, pairs, tmp_path, "val") == 3
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.png")}
    _damage(tmp_path / "000002.png", "flip")
    with caplog.at_level(logging.INFO):
        write_real_images(dataset, pairs, tmp_path, "val")
    assert "000002.png is corrupt" in caplog.text and "writing 3 real images" in caplog.text
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.png")} == before
