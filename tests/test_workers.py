"""Loader workers (data/workers.py) start from a fork server and change nothing: what two
workers load equals what the trainer process loads itself, for an image datamodule (stage 1,
its image checks included) and the token datamodule over it (stage 2, BPE-dropout drawn per
item)."""

from __future__ import annotations

import multiprocessing

import torch

from dalle_lightning.data.folder import FolderDataModule
from dalle_lightning.data.token_datamodule import TokenDataModule
from dalle_lightning.data.workers import worker_options
from dalle_lightning.models.dvae import DVAE, DVAEConfig
from dalle_lightning.text.tokenizer import TextConfig
from tests.conftest import assert_same
from tests.test_file_datasets import folder  # noqa: F401 (fixture)


def _epochs(loader, count: int = 2) -> list[list[dict]]:
    return [list(loader) for _ in range(count)]


def test_two_workers_load_what_the_trainer_process_loads(folder, tmp_path):  # noqa: F811
    loaded = {}
    for workers in (0, 2):
        images = FolderDataModule(
            str(folder),
            image_size=16,
            batch_size=1,
            val_fraction=0.3,
            num_workers=workers,
            max_bad_fraction=0.5,
        )
        images.setup()  # the image checks run in the workers too
        assert images.data_report()["train"]["skipped"] == {"missing": 1}
        torch.manual_seed(0)
        dvae = DVAE(DVAEConfig(image_size=16, vocab_size=8, n_hid=8, n_init=8, group_count=2))
        tokens = TokenDataModule(
            images, dvae, "sha", tmp_path / f"cache{workers}", TextConfig(64, 8, bpe_dropout=0.5)
        )
        tokens.prepare_data()
        tokens.setup()
        loaded[workers] = {
            "images": _epochs(images.train_dataloader()) + [list(images.val_dataloader())],
            "tokens": _epochs(tokens.train_dataloader()) + [list(tokens.val_dataloader())],
        }
    assert len(loaded[0]["images"][0]) == 2 and len(loaded[0]["tokens"][2]) == 1
    assert_same(loaded[2], loaded[0], "loaded")


def test_worker_options_name_the_fork_server_and_keep_workers():
    assert worker_options(0) == {"num_workers": 0}
    options = worker_options(2)
    assert options["num_workers"] == 2 and options["persistent_workers"] is True
    assert options["multiprocessing_context"] is multiprocessing.get_context("forkserver")
    assert worker_options(2, persistent=False)["persistent_workers"] is False
