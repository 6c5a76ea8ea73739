"""Non-finite losses: the step is skipped and counted; K in a row stop the run, weights intact."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dalle_lightning.callbacks.nonfinite import NonFiniteError, NonFiniteGuard
from dalle_lightning.cli import EXIT_TRAINING_DIVERGED, exit_on_user_error
from tests.conftest import run_script


class Regression(pl.LightningModule):
    """A linear fit whose loss is NaN at the steps in `bad_steps`."""

    def __init__(self, bad_steps: set[int]):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.bad_steps = bad_steps
        self.weights_before: dict[int, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.weights_before[self.global_step] = self.layer.weight.detach().clone()
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        if self.global_step in self.bad_steps:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)


def _fit(module: Regression, guard: NonFiniteGuard, steps: int, tmp_path) -> pl.Trainer:
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    return trainer


def test_nan_steps_are_skipped_and_counted(tmp_path):
    module = Regression(bad_steps={3, 4, 7})
    guard = NonFiniteGuard(max_in_row=3)
    trainer = _fit(module, guard, steps=10, tmp_path=tmp_path)
    assert guard.skipped == 3 and guard.in_row == 0
    for step in (3, 4, 7):  # the weights after a skipped step are the weights before it
        assert torch.equal(module.weights_before[step], module.weights_before[step + 1])
    assert not torch.equal(module.weights_before[1], module.weights_before[2])
    assert torch.isfinite(module.layer.weight).all()
    assert trainer.callback_metrics["train/nonfinite_steps"].item() == 3


def test_too_many_in_a_row_stop_with_a_clear_error(tmp_path):
    module = Regression(bad_steps=set(range(5, 100)))
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row") as err:
        _fit(module, NonFiniteGuard(max_in_row=3), steps=50, tmp_path=tmp_path)
    assert "last.ckpt" in str(err.value) and "max_in_row" in str(err.value)
    assert torch.isfinite(module.layer.weight).all()
    assert math.isfinite(module.layer.bias.item())


def test_the_entry_scripts_turn_it_into_one_line_and_exit_code_3(capsys):
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        raise NonFiniteError("20 optimizer steps in a row had non-finite gradients")
    assert exit_info.value.code == EXIT_TRAINING_DIVERGED == 3
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: 20 optimizer steps in a row had non-finite gradients"
    ]


def test_a_diverging_training_run_stops_with_exit_code_3(tmp_path):
    result = run_script(
        "train.py",
        "model.optimizer.lr=1e8",  # the first step blows the weights up; every later loss is inf
        "model.net.n_hid=8",
        "model.net.n_init=8",
        "dataset.image_size=32",
        "dataset.num_val=8",
        "dataset.num_test=8",
        "callbacks.nonfinite_guard.max_in_row=5",
        f"paths.log_dir={tmp_path}",
    )
    assert result.returncode == EXIT_TRAINING_DIVERGED, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 5 optimizer steps in a row had non-finite gradients")
    assert "callbacks.nonfinite_guard.max_in_row" in last
