"""Resume after a kill with nothing lost; checkpoint files that are safe to read and to write."""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dalle_lightning.checkpoints import read_checkpoint
from dalle_lightning.config import ConfigError
from dalle_lightning.data.resumable import ResumableLoader, ResumableSampler, SeededDraws
from dalle_lightning.runs import resume_checkpoint, run_dir
from tests.conftest import ROOT, assert_same, run_command, run_script
from tests.test_dalle_train import DATA, NET

RUN = [
    "model=dvae",
    "model.net.n_hid=8",
    "model.net.n_init=8",
    "model.net.vocab_size=32",
    "dataset.image_size=32",
    "dataset.num_train=48",  # 6 batches per epoch: the run crosses epochs
    "dataset.num_val=8",
    "dataset.num_test=8",
    "dataset.eval_batch_size=8",
    "trainer.max_steps=40",
    "trainer.val_check_interval=15",
    "trainer.deterministic=true",
    "callbacks=[default,ema]",  # the EMA state must survive too
    "callbacks.last_checkpoint.every_n_train_steps=4",
    "~callbacks.rich_progress_bar",
    "logger=default",  # CSV and TensorBoard
    "trainer.log_every_n_steps=1",
    "test=false",
]


KEEP_STEP_CHECKPOINTS = [  # every last.ckpt save (each 4 steps) also as its own s<step>.ckpt
    "callbacks.last_checkpoint.save_top_k=-1",
    "+callbacks.last_checkpoint.filename='s{step}'",
    "+callbacks.last_checkpoint.auto_insert_metric_name=false",
]


def _train(log_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_script("train.py", *RUN, f"paths.log_dir={log_dir}", *extra)


def _full_and_resumed_from_step_4(tmp_path: Path, *extra: str) -> tuple[dict, dict]:
    """The last checkpoints of a full run and of a run resumed from the full run's step 4."""
    full = _train(tmp_path / "full", *extra, *KEEP_STEP_CHECKPOINTS)
    assert full.returncode == 0, full.stderr[-2000:]
    (step4,) = (tmp_path / "full").glob("train_dvae/runs/*/checkpoints/s4.ckpt")
    resumed = _train(tmp_path / "resumed", *extra, f"ckpt_path={step4}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    full_last = torch.load(_last(tmp_path / "full"), weights_only=True)
    return full_last, torch.load(_last(tmp_path / "resumed"), weights_only=True)


def _start_past_its_first_checkpoint(
    log_dir: Path,
    stderr,
    run: list[str] = RUN,
    stage: str = "train_dvae",
    wait: float = 0.3,
    env: dict | None = None,
) -> subprocess.Popen:
    """`run` in a subprocess, returned once it has written last.ckpt and trained `wait`
    seconds further: somewhere between two 4-step saves, where a signal tests something."""
    cmd = [sys.executable, "train.py", *run, f"paths.log_dir={log_dir}"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, text=True, env=env
    )
    deadline = time.monotonic() + 120
    while not list(log_dir.glob(f"{stage}/runs/*/checkpoints/last.ckpt")):
        assert proc.poll() is None and time.monotonic() < deadline, (
            "no checkpoint before the signal"
        )
        time.sleep(0.02)
    time.sleep(wait)
    return proc


def _last(log_dir: Path, stage: str = "train_dvae") -> Path:
    (path,) = log_dir.glob(f"{stage}/runs/*/checkpoints/last.ckpt")
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The last checkpoint of RUN's 40 steps without an interruption: what every stopped and
    resumed run below must end with. RUN is deterministic, so it is trained once for them all
    (the tests only read it)."""
    log_dir = tmp_path_factory.mktemp("uninterrupted")
    full = _train(log_dir)
    assert full.returncode == 0, full.stderr[-3000:]
    return torch.load(_last(log_dir), weights_only=True)


def test_sigkill_mid_run_then_resume_ends_bitwise_equal(tmp_path, uninterrupted):
    killed_dir = tmp_path / "killed"
    proc = _start_past_its_first_checkpoint(killed_dir, stderr=subprocess.DEVNULL)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(_last(killed_dir), weights_only=True)["global_step"]
    assert 0 < killed_at < 40, f"the kill came too late (step {killed_at}) to test anything"

    resumed = _train(killed_dir, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(list(killed_dir.glob("train_dvae/runs/*"))) == 1  # continued in the same run dir

    a = uninterrupted
    b = torch.load(_last(killed_dir), weights_only=True)
    assert a["global_step"] == b["global_step"] == 40
    for key in ("state_dict", "current_model_state", "optimizer_states", "lr_schedulers"):
        assert_same(a[key], b[key], key)  # weights, EMA, AdamW moments, LR schedule
    assert a["lr_schedulers"] == b["lr_schedulers"]

    # the logger run continues: every training log step once, up to the end
    (metrics_csv,) = killed_dir.glob("train_dvae/runs/*/csv/metrics.csv")
    with metrics_csv.open() as file:
        steps = [int(r["step"]) for r in csv.DictReader(file) if r.get("train/loss")]
    assert steps == list(range(40))
    (tensorboard,) = killed_dir.glob("train_dvae/runs/*/tensorboard")
    events = EventAccumulator(str(tensorboard))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(40))  # purged, no repeats


def test_sigterm_writes_last_ckpt_at_the_step_and_resume_ends_bitwise_equal(
    tmp_path, uninterrupted
):
    """SIGTERM (what SLURM and spot instances send before a kill) mid-epoch: the run stops at
    the next batch boundary, writes last.ckpt at that step (not only at the last 4-step
    save), exits with code 4 and one line saying how to resume; resumed, it ends bitwise equal
    to an uninterrupted run."""
    stopped_dir = tmp_path / "stopped"
    proc = _start_past_its_first_checkpoint(stopped_dir, stderr=subprocess.PIPE)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 4, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert lines == [lines[0]] and "received SIGTERM" in lines[0] and "resume=true" in lines[0]
    stopped_at = torch.load(_last(stopped_dir), weights_only=True)["global_step"]
    assert 0 < stopped_at < 40, f"SIGTERM came too late (step {stopped_at}) to test anything"
    (log_file,) = stopped_dir.glob("train_dvae/runs/*/train_dvae.log")
    said = log_file.read_text()  # at an epoch's end the periodic save is kept (test below)
    assert f"SIGTERM: training stopped at step {stopped_at};" in said or (
        "SIGTERM at the end of an epoch" in said
    )

    resumed = _train(stopped_dir, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = uninterrupted
    b = torch.load(_last(stopped_dir), weights_only=True)
    assert a["global_step"] == b["global_step"] == 40
    for key in ("state_dict", "current_model_state", "optimizer_states", "lr_schedulers"):
        assert_same(a[key], b[key], key)


@pytest.mark.parametrize(
    ("step", "hook", "saved_at"),
    [  # 6 batches per epoch; the periodic saves are at steps 4, 8, ...
        (4, "batch_start", 5),  # during a step mid-epoch: saved at its end
        (5, "batch_start", 6),  # during the last step of an epoch: saved at its end
        (3, "batch_end", 3),  # after the save hook ran, mid-epoch: saved when the loop stops
        (6, "epoch_end", 4),  # in the epoch's end hooks: the periodic save of step 4 stays
    ],
)
def test_sigterm_at_an_epochs_end_still_resumes_bitwise(
    tmp_path, uninterrupted, step, hook, saved_at
):
    """The signal sent from inside the run at a chosen step and hook (tests/signal_at_step.py),
    so the epoch boundary is hit every time rather than by chance."""
    signal_at = [
        "+callbacks.signal._target_=tests.signal_at_step.SignalAtStep",
        f"+callbacks.signal.step={step}",
        f"+callbacks.signal.hook={hook}",
    ]
    stopped = _train(tmp_path / "stopped", *signal_at)
    assert stopped.returncode == 4, stopped.stderr[-3000:]
    assert torch.load(_last(tmp_path / "stopped"), weights_only=True)["global_step"] == saved_at
    resumed = _train(tmp_path / "stopped", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = uninterrupted
    b = torch.load(_last(tmp_path / "stopped"), weights_only=True)
    assert a["global_step"] == b["global_step"] == 40
    for key in ("state_dict", "current_model_state", "optimizer_states", "lr_schedulers"):
        assert_same(a[key], b[key], key)


def test_slurm_requeue_signal_then_the_requeued_job_resumes_by_itself(tmp_path, uninterrupted):
    """Under SLURM (its environment faked, a stand-in `scontrol` on PATH): the requeue signal
    (SIGUSR1) stops the run at the step's end, writes last.ckpt, calls `scontrol requeue <job
    id>` and exits with code 4 (Lightning's own handler, which saves inside the signal handler,
    is replaced: no hpc checkpoint). The same command, started again by SLURM with
    SLURM_RESTART_COUNT=1 and no resume=true, continues that run and ends bitwise equal to an
    uninterrupted one."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "train",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }
    job = tmp_path / "job"
    proc = _start_past_its_first_checkpoint(job, subprocess.PIPE, env=slurm)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 4, stderr[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    (run,) = job.glob("train_dvae/runs/*")
    assert not list(run.glob("hpc_ckpt_*.ckpt"))  # Lightning's in-handler save did not run
    stopped_at = torch.load(_last(job), weights_only=True)["global_step"]
    assert 0 < stopped_at < 40, f"the signal came too late (step {stopped_at})"
    assert (
        f"requeue signal: training stopped at step {stopped_at}"
        in (run / "train_dvae.log").read_text()
    )

    requeued = run_command(
        [sys.executable, "train.py", *RUN, f"paths.log_dir={job}"],
        env={**slurm, "SLURM_RESTART_COUNT": "1"},
    )
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    message = "SLURM requeued this job (restart 1): resuming from its last.ckpt"
    assert message in (run / "train_dvae.log").read_text()
    assert list(job.glob("train_dvae/runs/*")) == [run]  # continued in the same run directory
    a = uninterrupted
    b = torch.load(_last(job), weights_only=True)
    assert a["global_step"] == b["global_step"] == 40
    for key in ("state_dict", "current_model_state", "optimizer_states", "lr_schedulers"):
        assert_same(a[key], b[key], key)


def test_default_stage_2_sigkilled_then_resumed_ends_bitwise_equal(tmp_path, tiny_dvae):
    """The prior with model=dalle's defaults, BPE-dropout 0.1 and caption dropout included
    (a tiny net and dVAE, 40 steps, 16 batches per epoch)."""
    run = [
        "model=dalle",
        f"model.dvae_ckpt={tiny_dvae}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        *DATA,
        *NET,
        "trainer.max_steps=40",
        "trainer.val_check_interval=10",
        "callbacks.last_checkpoint.every_n_train_steps=4",
        "~callbacks.rich_progress_bar",
        "logger=csv",
        "test=false",
    ]
    assert "model.text.bpe_dropout=0" not in run
    full = run_script("train.py", *run, f"paths.log_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    proc = _start_past_its_first_checkpoint(killed_dir, subprocess.DEVNULL, run, "train_dalle", 0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(_last(killed_dir, "train_dalle"), weights_only=True)["global_step"]
    assert 0 < killed_at < 40, f"the kill came too late (step {killed_at}) to test anything"

    resumed = run_script("train.py", *run, f"paths.log_dir={killed_dir}", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(_last(tmp_path / "full", "train_dalle"), weights_only=True)
    b = torch.load(_last(killed_dir, "train_dalle"), weights_only=True)
    assert a["global_step"] == b["global_step"] == 40
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert_same(a[key], b[key], key)


@pytest.mark.parametrize("step_seed", [True, False])
def test_resume_from_a_step_checkpoint_matches_only_with_step_seeding(tmp_path, step_seed):
    """The equality is not free: without re-seeding per step the Gumbel noise differs."""
    extra = ["trainer.max_steps=12", "callbacks=[default]", "trainer.val_check_interval=6"]
    extra += [] if step_seed else ["~callbacks.step_seed"]
    a, b = _full_and_resumed_from_step_4(tmp_path, *extra)
    assert a["global_step"] == b["global_step"] == 12
    same = all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert same == step_seed


def test_sampler_order_depends_on_seed_and_epoch_only_and_skips_done_batches():
    sampler = ResumableSampler(10, seed=3)
    sampler.set_epoch(2)
    epoch2 = list(sampler)
    assert sorted(d % 10 for d in epoch2) == list(range(10)) and min(epoch2) >= 20
    again = ResumableSampler(10, seed=3)
    again.set_epoch(2)
    assert list(again) == epoch2
    sampler.set_epoch(1)
    assert [d % 10 for d in sampler] != [d % 10 for d in epoch2]

    loader = ResumableLoader(
        SeededDraws(list(range(10)), seed=3),
        sampler=ResumableSampler(10, seed=3),
        progress=lambda: 2,
        batch_size=3,
        drop_last=True,
    )
    loader.sampler.set_epoch(2)
    assert loader.state_dict() == {"epoch": 2, "batches": 2}
    loader.load_state_dict({"epoch": 2, "batches": 2})
    assert [b.tolist() for b in loader] == [[d % 10 for d in epoch2[6:9]]]
    loader.load_state_dict({"epoch": 2, "batches": 3})  # the epoch was finished: next one
    assert loader.sampler.epoch == 3 and loader.sampler.skip == 0


def test_ranks_share_one_order_a_global_batch_at_a_time_and_skip_their_own_done_batches():
    """DDP: rank r takes every world_size-th draw of the single-process order, so step k's
    batches over all ranks are the single process's batch k with a world_size x larger batch."""
    one = list(ResumableSampler(11, seed=5))
    ranks = [list(ResumableSampler(11, seed=5, rank=r, world_size=2)) for r in (0, 1)]
    assert [len(r) for r in ranks] == [5, 5]  # the 11th draw is left out, as drop_last would
    for step in range(2):  # per-rank batch 2, global batch 4
        shares = ranks[0][2 * step : 2 * step + 2] + ranks[1][2 * step : 2 * step + 2]
        assert sorted(shares) == sorted(one[4 * step : 4 * step + 4])
    resumed = ResumableSampler(11, seed=5, rank=1, world_size=2)
    resumed.skip = 2  # one batch of 2 done on this rank
    assert list(resumed) == ranks[1][2:]
    with pytest.raises(ValueError, match="rank=2 with world_size=2"):
        ResumableSampler(11, seed=5, rank=2, world_size=2)


def test_seeded_draws_repeat_their_randomness_and_leave_the_global_generator_alone():
    class Noisy:
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return index, torch.rand(())

    data = SeededDraws(Noisy(), seed=0)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    first, second, other_epoch = data[6], data[6], data[10]
    assert torch.equal(torch.get_rng_state(), before)
    assert first[0] == other_epoch[0] == 2
    assert first[1] == second[1] and first[1] != other_epoch[1]


def test_resume_without_a_previous_run_says_so(tmp_path):
    result = run_script("train.py", "resume=true", f"paths.log_dir={tmp_path}")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "resume=True is invalid" in line and "train_dvae" in line and "last.ckpt" in line


def test_a_requeued_slurm_job_without_a_checkpoint_starts_afresh(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    runs = tmp_path / "train_dvae" / "runs"
    assert run_dir(str(runs), False, None, "new") == f"{runs}/new"  # nothing to resume
    (runs / "old" / "checkpoints").mkdir(parents=True)
    cfg = OmegaConf.create({"paths": {"output_dir": str(runs / "old")}, "task_name": "t"})
    assert resume_checkpoint(cfg) == (None, 0)  # requeued before its first checkpoint
    torch.save({"global_step": 7}, runs / "old" / "checkpoints" / "last.ckpt")
    assert run_dir(str(runs), False, None, "new") == str(runs / "old")
    assert resume_checkpoint(cfg) == (str(runs / "old" / "checkpoints" / "last.ckpt"), 7)
    assert run_dir(str(runs), False, "/some/file.ckpt", "new") == f"{runs}/new"  # as given
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    assert resume_checkpoint(cfg) == (None, 0) and run_dir(str(runs), False, None, "n") != str(
        runs / "old"
    )


def test_truncated_checkpoint_is_reported_with_its_path(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.randn(256, 256)}}, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ConfigError, match="truncated or corrupt") as err:
        read_checkpoint(path)
    assert str(path) in str(err.value)
    result = run_script("train.py", f"ckpt_path={path}", f"paths.log_dir={tmp_path}")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert str(path) in line and "truncated or corrupt" in line
    assert not list(tmp_path.glob("train_dvae/runs/*/checkpoints/*.ckpt"))  # nothing started


def test_checkpoints_with_pickled_objects_need_an_explicit_flag(tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"args": argparse.Namespace(lr=1.0), "global_step": 3}, path)
    with pytest.raises(ConfigError, match="trust_checkpoint=true"):
        read_checkpoint(path)
    assert read_checkpoint(path, trusted=True)["args"].lr == 1.0


def test_a_kill_during_a_checkpoint_save_never_leaves_a_truncated_file(tmp_path):
    """Lightning writes checkpoints through fsspec's transaction (temp file, then rename)."""
    path = tmp_path / "last.ckpt"
    script = (
        "import sys, torch\n"
        "from lightning.pytorch.plugins.io import TorchCheckpointIO\n"
        "io = TorchCheckpointIO()\n"
        "for i in range(10**6):\n"
        "    io.save_checkpoint({'i': i, 'w': torch.full((4_000_000,), float(i))}, sys.argv[1])\n"
    )
    saves = []
    for delay in (0.05, 0.13, 0.29):
        proc = subprocess.Popen([sys.executable, "-c", script, str(path)])
        deadline = time.monotonic() + 120
        while not path.exists():  # the first save of this process is complete
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        first = torch.load(path, weights_only=True)["i"]
        time.sleep(delay)  # now somewhere inside a later save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = TorchCheckpointIO().load_checkpoint(path, weights_only=True)  # never partial
        assert torch.equal(ckpt["w"], torch.full((4_000_000,), float(ckpt["i"])))
        saves.append(ckpt["i"] - first)
        path.unlink()
    assert max(saves) > 0, "no save completed after the first one; nothing was tested"
    leftovers = [p for p in os.listdir(tmp_path) if p != "last.ckpt"]
    assert len(leftovers) <= 3  # at most one temporary file per killed save


def test_ddp_resumes_mid_epoch_at_the_next_batch(tmp_path):
    """trainer=ddp (2 gloo ranks, 3 batches per rank and epoch): a run resumed from step 4,
    mid-epoch, ends with the uninterrupted run's weights."""
    extra = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.max_steps=8"]
    extra += ["callbacks=[default]", "trainer.val_check_interval=4"]
    a, b = _full_and_resumed_from_step_4(tmp_path, *extra)
    assert a["global_step"] == b["global_step"] == 8
    assert_same(a["state_dict"], b["state_dict"], "state_dict")
