"""Shared fixtures: Hydra configs composed exactly as the entry scripts compose them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from dalle_lightning.checkpoints import export_dvae
from dalle_lightning.models.dvae import DVAE, DVAEConfig
from dalle_lightning.runs import register_resolvers

register_resolvers()
# Under pytest-xdist (pyproject.toml's `-n 2`: one worker per core) each worker and every
# process it starts computes on one thread. With torch's default of one thread per core, the
# two workers' OpenMP teams oversubscribe the cores and some tests ran 10-30x slower.
if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # read by the processes the tests start
ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose conf/<config_name>.yaml with `overrides`, writing under `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=config_name):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:...} as in a real run
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.log_dir = str(output_dir)
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A test that runs a command's main in this process (benchmark, compare_dalle_pytorch) may
    set torch's thread count: the next tests get back the count they would have had. Left at 2
    in an xdist worker, it oversubscribed the cores (a 12 s test took 152 s)."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture
def make_cfg(tmp_path):
    def make(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
        return compose_config(config_name, overrides or [], tmp_path)

    yield make
    GlobalHydra.instance().clear()


def run_command(
    command: list[str], *, timeout: float = 300, cwd: Path = ROOT, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True)`, in a process group of its own.

    What it starts (DDP ranks, the loader workers' fork server and workers) is in that group.
    On timeout every process in it gets SIGABRT, one after the other, so that each prints the
    Python stack of every thread to the captured stderr (`PYTHONFAULTHANDLER=1` is set), then
    SIGKILL; the test fails with that stderr. Nothing is left running either way, to compete
    for CI's two cores."""
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    with subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _dump_stacks(proc.pid)
            try:
                stdout, stderr = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                stdout, stderr = proc.communicate()
            pytest.fail(
                f"{' '.join(map(str, command))!r} ran past {timeout} s; the stacks of its "
                f"processes at that moment, from their stderr:\n{stderr[-12000:]}"
            )
        finally:
            _signal_group(proc.pid, signal.SIGKILL)  # anything it left behind
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _dump_stacks(pgid: int) -> None:
    """SIGABRT to each process of group `pgid` in turn, the leader last, 0.2 s apart: their
    dumps, written piece by piece to one pipe, interleave mid-line when sent at once."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # a process that exits while being listed
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
            if int(fields[2]) == pgid and int(stat.parent.name) != pgid:
                members.append(int(stat.parent.name))
    for pid in [*sorted(members, reverse=True), pgid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGABRT)
            time.sleep(0.2)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group has no process left
        os.killpg(pgid, sig)


def run_script(
    script: str, *args: str, timeout: float = 300, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    """Run `python <script> args...` from the repository root (or `cwd`), as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(ROOT / script), *args]
    return run_command(command, timeout=timeout, cwd=cwd, env=env)


def write_tiny_dvae(path: Path) -> Path:
    """A randomly initialised dVAE: 32 px -> 8 x 8 codes from 32 (its codes mean nothing);
    the same weights on every call."""
    torch.manual_seed(0)
    dvae = DVAE(DVAEConfig(image_size=32, n_hid=8, n_init=8, vocab_size=32))
    torch.save(export_dvae(dvae), path)
    return path


def assert_same(a, b, where: str = "") -> None:
    """`a` and `b` hold the same values: tensors bitwise, dicts key by key, sequences item by
    item, anything else by `==`; `where` names the first difference."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture
def tiny_dvae(tmp_path) -> Path:
    return write_tiny_dvae(tmp_path / "dvae.pt")
