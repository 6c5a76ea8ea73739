"""Sweeps: the Optuna search configs run trials and report the best, sweep_summary.json
collects every job's metrics.json, and the submitit launchers compose (local runs jobs)."""

from __future__ import annotations

import json

import pytest
import yaml
from hydra.utils import get_class
from omegaconf import OmegaConf

from dalle_lightning.callbacks.sweep_summary import summarize_sweep
from tests.conftest import run_script
from tests.test_dalle_train import DATA, NET
from tests.test_train import TINY

DVAE_TINY = ["model=dvae", "trainer.max_steps=4", "callbacks=none", "logger=none", *TINY]

SEARCHES = [("shapes_dvae_optuna", "DVAEModule"), ("shapes_dalle_optuna", "DalleModule")]


def _job(path, name, value, overrides=(), metric="val/loss"):
    (path / name).mkdir(parents=True)
    summary = {
        "overrides": list(overrides),
        "wall_time_s": 1.0,
        "metrics": {metric: value},
        "optimized_metric": {"name": metric, "value": value},
        "run_dir": str(path / name),
        "checkpoints": {"best": f"{name}.ckpt", "last": None},
    }
    (path / name / "metrics.json").write_text(json.dumps(summary))


def test_sweep_summary_orders_jobs_and_picks_the_best(tmp_path):
    for name, value in (("0", 2.0), ("1", 1.5), ("2", None), ("10", 3.0)):
        _job(tmp_path, name, value, [f"lr={name}"])
    (tmp_path / "3").mkdir()  # a failed job: no metrics.json
    (tmp_path / ".submitit").mkdir()  # not a job
    summary = summarize_sweep(tmp_path)
    assert [j["job"] for j in summary["jobs"]] == ["0", "1", "2", "10"]  # numeric order
    assert summary["missing"] == ["3"]
    assert summary["optimized_metric"] == "val/loss"
    assert summary["best"]["job"] == "1" and summary["best"]["checkpoint"] == "1.ckpt"
    assert summarize_sweep(tmp_path, "maximize")["best"]["value"] == 3.0  # None never wins
    with pytest.raises(ValueError, match="direction='lowest'"):
        summarize_sweep(tmp_path, "lowest")


def test_optuna_search_on_the_prior_runs_two_trials_and_reports_the_best(tiny_dvae, tmp_path):
    result = run_script(
        "train.py",
        "-m",
        "hparams_search=shapes_dalle_optuna",
        "hydra.sweeper.n_trials=2",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "logger=none",
        f"model.dvae_ckpt={tiny_dvae}",
        *DATA,
        *NET,
        cwd=tmp_path,  # logs/ under the launch directory: the sweep dir resolves before the jobs
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "logs" / "train_dalle" / "multiruns").iterdir()
    optuna = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert [j["job"] for j in summary["jobs"]] == ["0", "1"] and summary["missing"] == []
    assert summary["direction"] == "minimize"  # read from the sweeper's config
    values = [j["value"] for j in summary["jobs"]]
    assert summary["best"]["value"] == min(values) == pytest.approx(optuna["best_value"])
    # every searched setting was sampled inside its range and reached the job
    assert set(optuna["best_params"]) == {
        "model.optimizer.lr",
        "model.optimizer.weight_decay",
        "model.warmup_steps",
        "model.net.dropout",
    }
    for job in summary["jobs"]:
        sampled = dict(o.split("=", 1) for o in job["overrides"] if o.startswith("model."))
        assert 2.0e-4 <= float(sampled["model.optimizer.lr"]) <= 3.0e-3
        assert sampled["model.warmup_steps"] in ("50", "100", "200")
        config = yaml.safe_load((sweep / job["job"] / ".hydra" / "config.yaml").read_text())
        assert config["model"]["optimizer"]["lr"] == float(sampled["model.optimizer.lr"])
        assert config["test"] is False
    assert "best: job" in result.stderr + result.stdout


@pytest.mark.parametrize(("search", "module"), SEARCHES)
def test_search_configs_name_settings_that_exist(make_cfg, search, module):
    cfg = make_cfg([f"hparams_search={search}"])
    assert get_class(cfg.hydra.sweeper._target_).__name__ == "OptunaSweeper"
    assert cfg.model._target_.endswith(module)
    absent = object()
    for key in cfg.hydra.sweeper.params:  # a typo would only fail at the first trial
        assert OmegaConf.select(cfg, key, default=absent) is not absent, key


def test_slurm_launcher_asks_one_task_per_device(make_cfg):
    cfg = make_cfg(["launcher=slurm", "trainer.devices=4", "trainer.num_nodes=2"])
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.precision == "16-mixed"


def test_local_launcher_runs_jobs_in_subprocesses_and_summarizes(tmp_path):
    result = run_script(
        "train.py",
        "-m",
        "launcher=local",
        *DVAE_TINY,
        "model.net.n_hid=8,16",  # after TINY's n_hid=8
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "logs" / "train_dvae" / "multiruns").iterdir()
    assert list((sweep / ".submitit").glob("*/*_log.out"))  # ran through submitit
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert [j["job"] for j in summary["jobs"]] == ["0", "1"]
    assert [
        "model.net.n_hid=8" in summary["jobs"][0]["overrides"],
        "model.net.n_hid=16" in summary["jobs"][1]["overrides"],
    ] == [True, True]
