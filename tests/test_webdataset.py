"""dataset=webdataset: shards written from a dataset read back completely (no sample lost or
repeated across loader workers), bad images are skipped, too few shards fail before work,
token shards hold the token cache's codes, and both stages train on shards."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import tarfile
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from dalle_lightning.checkpoints import file_sha256
from dalle_lightning.config import ConfigError
from dalle_lightning.data.coco import CocoDataModule
from dalle_lightning.data.datamodule import collate_image_text
from dalle_lightning.data.shapes import ShapesDataModule
from dalle_lightning.data.shards import encode_shards, main, write_shards
from dalle_lightning.data.token_cache import encode_dataset
from dalle_lightning.data.web_datamodule import WebDataModule
from dalle_lightning.models.dvae import DVAE
from dalle_lightning.train import train
from tests.conftest import run_script
from tests.test_dalle_train import NET
from tests.test_file_datasets import COCO_MINI, needs_coco
from tests.test_train import TINY

SIZES = {"num_train": 30, "num_val": 8, "num_test": 8}


@pytest.fixture
def shards(tmp_path):
    """The built-in shapes (32 px) as shards of at most 7 samples: train has 5."""
    shapes = ShapesDataModule(image_size=32, batch_size=4, **SIZES)
    write_shards(shapes, tmp_path / "shards", maxcount=7)
    return tmp_path / "shards", shapes


def _web(root, **kwargs) -> WebDataModule:
    return WebDataModule(root=str(root), image_size=32, batch_size=4, **kwargs)


def test_shards_read_back_every_sample_once_across_two_workers(shards):
    root, shapes = shards
    manifest = json.loads((root / "train.json").read_text())
    assert manifest["count"] == 30 and len(manifest["shards"]) == 5
    assert manifest["data"] == shapes.identity()
    web = _web(root)
    loader = DataLoader(
        web.stream("train"), batch_size=4, num_workers=2, collate_fn=collate_image_text
    )
    keys, captions = [], {}
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 32, 32)
        keys += batch["key"]
        captions.update(zip(batch["key"], batch["caption"], strict=True))
    assert sorted(keys) == [f"{i:09d}" for i in range(30)]  # none lost, none twice
    expected = shapes.cache_dataset("train")
    assert [captions[f"{i:09d}"] for i in range(30)] == [expected[i]["caption"] for i in range(30)]
    # the pixels survive the PNG round trip exactly (eval transform at the same size)
    first = next(iter(web.stream("train")))
    torch.testing.assert_close(first["image"], expected[0]["image"], atol=1 / 255, rtol=0)


def test_ranks_read_disjoint_shards_that_cover_the_split(shards):
    keys = []
    for rank in (0, 1):  # what each DDP rank's val loader reads
        web = _web(shards[0], num_workers=2)
        web.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        keys.append([k for batch in web.val_dataloader() for k in batch["key"]])
    web.trainer = None
    assert keys[0] and keys[1] and not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == [f"{i:09d}" for i in range(8)]  # val: 2 shards
    # the token cache reads a whole split whatever the rank
    web.trainer = SimpleNamespace(global_rank=1, world_size=2)
    assert len([item["key"] for item in web.cache_dataset("val")]) == 8


def test_training_stream_shuffles_and_its_epoch_is_train_size_over_the_batch(shards):
    web = _web(shards[0], num_workers=2, shuffle_buffer=16)
    loader = web.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 30 // 4
    keys = [k for b in batches for k in b["key"]]
    assert len(set(keys)) > 20 and keys != sorted(keys)  # mixed, mostly distinct


def test_loader_workers_start_once_from_a_fork_server_never_by_forking_the_trainer(
    shards, monkeypatch
):
    """Workers come from a fork server (data/workers.py) and are kept across epochs. Forking
    the trainer itself, whose other threads run Python under DDP, left a worker hung in
    CPython's after-fork reinit in 2 of 11 two-rank runs (the DDP test below)."""
    forks, starts = [], []
    fork, start = os.fork, multiprocessing.process.BaseProcess.start

    def counted_fork() -> int:
        pid = fork()
        if pid:
            forks.append(pid)
        return pid

    def counted_start(process) -> None:
        starts.append(type(process).__name__)
        start(process)

    monkeypatch.setattr(os, "fork", counted_fork)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", counted_start)
    web = _web(shards[0], num_workers=2)
    train, val = web.train_dataloader(), web.val_dataloader()
    for _ in range(3):  # epochs
        assert len(list(train)) == 30 // 4
        assert sorted(k for batch in val for k in batch["key"]) == [f"{i:09d}" for i in range(8)]
    assert starts == ["ForkServerProcess"] * 4  # two workers per loader, once
    assert forks == []


def test_too_few_shards_for_the_readers_fail_before_any_work(shards):
    web = _web(shards[0], num_workers=6)  # 5 training shards, 6 workers
    with pytest.raises(ConfigError, match="at least one shard per rank x loader worker"):
        web.train_dataloader()
    with pytest.raises(ConfigError, match="dataset.root"):
        _web(shards[0] / "missing")


def test_a_broken_image_in_a_shard_is_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "train-000000.tar"
    with tarfile.open(path, "w") as tar:
        for key, payload in (("a", b"not an image"), ("b", _png())):
            for name, data in ((f"{key}.png", payload), (f"{key}.json", b'{"captions": ["x"]}')):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    web = WebDataModule(train=str(path), val=str(path), test=str(path), train_size=1, image_size=8)
    with caplog.at_level(logging.WARNING):
        items = list(web.stream("val"))
    assert [item["key"] for item in items] == ["b"]
    assert "skipped" in caplog.text and "unreadable" in caplog.text


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_token_shards_hold_the_token_cache_codes_and_name_their_dvae(shards, tiny_dvae, tmp_path):
    root, _ = shards
    web = _web(root)
    dvae = DVAE.from_checkpoint(tiny_dvae)
    sha = file_sha256(tiny_dvae)
    encode_shards(web, dvae, sha, tmp_path / "tokens", splits=("val",), maxcount=3)
    tokens = _web(root, token_shards=str(tmp_path / "tokens")).pre_encoded("val", sha)
    cached = encode_dataset(dvae, web.cache_dataset("val"))
    assert torch.equal(tokens["codes"], cached["codes"]) and tokens["codes"].shape == (8, 8, 8)
    assert tokens["captions"] == cached["captions"]
    with pytest.raises(ConfigError, match="token shards of this dVAE"):
        _web(root, token_shards=str(tmp_path / "tokens")).pre_encoded("val", "0" * 64)


def test_shards_command_writes_a_configured_dataset(tmp_path):
    sizes = [f"dataset.{k}={v}" for k, v in SIZES.items()]
    out = tmp_path / "cli"
    assert main(["write", str(out), "--maxcount", "10", "dataset.image_size=32", *sizes]) == 0
    assert json.loads((out / "val.json").read_text())["count"] == 8
    with pytest.raises(SystemExit):
        main(["encode", str(out)])  # --dvae is required


def test_both_stages_train_on_shards(shards, tiny_dvae, make_cfg, tmp_path):
    common = [
        "dataset=webdataset",
        f"dataset.root={shards[0]}",
        "dataset.image_size=32",
        "dataset.batch_size=4",
        "dataset.num_workers=1",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.accelerator=cpu",
        "logger=csv",
    ]
    _, dvae_summary = train(make_cfg(["model=dvae", *common, "model.net.n_hid=8"]))
    assert dvae_summary["global_step"] == 2 and dvae_summary["metrics"]["test/psnr"] > 0
    _, prior = train(make_cfg(["model=dalle", f"model.dvae_ckpt={tiny_dvae}", *common, *NET]))
    assert prior["global_step"] == 2 and prior["metrics"]["test/loss"] > 0


def test_ddp_trains_on_shards_with_two_processes(shards, tmp_path):
    """Two ranks (gloo) stream their own training shards and share val/test by sample: no
    rank is left without val data (it would hang the epoch-end sync)."""
    result = run_script(
        "train.py",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "dataset=webdataset",
        f"dataset.root={shards[0]}",
        "dataset.num_workers=1",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "logger=csv",
        f"paths.log_dir={tmp_path / 'logs'}",
        *[o for o in TINY if not o.startswith(("dataset.num_", "trainer.accelerator"))],
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = (tmp_path / "logs" / "train_dvae" / "runs").iterdir()
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["global_step"] == 4 and summary["metrics"]["test/psnr"] > 0


@needs_coco
def test_real_coco_shards_keep_the_jpeg_bytes_and_val_and_test_share_shards(tmp_path):
    coco = CocoDataModule(str(COCO_MINI), image_size=64, num_workers=0, max_bad_fraction=1.0)
    manifests = write_shards(coco, tmp_path, splits=("val", "test"), maxcount=100)
    assert manifests["val"]["count"] == 159 and manifests["val"]["report"]["usable"] == 159
    assert (
        manifests["test"]["shards"]
        == manifests["val"]["shards"]
        == ["val-000000.tar", "val-000001.tar"]
    )
    with tarfile.open(tmp_path / "val-000000.tar") as tar:
        first = tar.extractfile(tar.getmember("000000000.jpg")).read()
    assert first == coco.items("val")[0].path.read_bytes()  # the original file, not re-encoded
    web = WebDataModule(
        root=str(tmp_path),
        val=None,
        train=str(tmp_path / "val-000000.tar"),
        train_size=100,
        image_size=64,
    )
    assert web.source("test") == "val"  # one token cache for both
