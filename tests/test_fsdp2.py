"""trainer=fsdp: FSDP2 (torch's fully_shard) under Lightning's ModelParallelStrategy, run as a
user runs it: `python train.py ... trainer=fsdp trainer.accelerator=cpu trainer.devices=2`, two
CPU ranks over gloo. The runs are tiny (a 2-block prior, an 8-channel dVAE, 4-8 steps)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from dalle_lightning import consolidate
from dalle_lightning.checkpoints import is_sharded
from tests.conftest import run_command, run_script, write_tiny_dvae
from tests.test_dalle_train import SAME_ON_EVERY_RANK
from tests.test_resume import KEEP_STEP_CHECKPOINTS

FSDP = ["trainer=fsdp", "trainer.devices=2"]
EIGHT_STEPS_SAVED_EVERY_4 = [  # s4.ckpt and s8.ckpt kept: a run to resume from step 4
    "trainer.max_steps=8",
    "trainer.val_check_interval=4",
    "callbacks=[default]",
    "callbacks.last_checkpoint.every_n_train_steps=4",
    *KEEP_STEP_CHECKPOINTS,
]


@pytest.fixture(scope="module")
def dvae(tmp_path_factory) -> Path:
    """The module's tiny dVAE; its token cache, beside it, is built by the first prior run."""
    return write_tiny_dvae(tmp_path_factory.mktemp("fsdp2") / "dvae.pt")


def _prior(dvae: Path, log_dir: Path, *extra: str) -> Path:
    """Train the tiny prior; returns its run directory."""
    run = run_script(
        "train.py",
        *SAME_ON_EVERY_RANK,
        f"model.dvae_ckpt={dvae}",
        f"paths.cache_dir={dvae.parent / 'cache'}",
        f"paths.log_dir={log_dir}",
        *extra,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (path,) = (log_dir / "train_dalle" / "runs").iterdir()
    return path


def _logs(run: Path) -> str:
    return "".join(f.read_text() for f in run.glob("*.log"))


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _consolidate(ckpt: Path, as_a_command: bool = False) -> dict:
    """`python -m dalle_lightning.consolidate CKPT --out CKPT.pt`, then its output; in this
    process unless `as_a_command` (each command costs a Python start and the torch import)."""
    args = [str(ckpt), "--out", f"{ckpt}.pt"]
    if as_a_command:
        command = [sys.executable, "-m", "dalle_lightning.consolidate", *args]
        done = run_command(command, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"{ckpt}.pt: " in done.stdout and "python evaluate.py task=generate" in done.stdout
    else:
        assert consolidate.main(args) == Path(f"{ckpt}.pt")
    return torch.load(f"{ckpt}.pt", weights_only=True)


@pytest.fixture(scope="module")
def plain(dvae, tmp_path_factory) -> tuple[Path, dict]:
    """The tiny prior under trainer=fsdp's defaults (4 steps) and its last checkpoint
    consolidated into `last.ckpt.pt`: trained once, read by the two tests below."""
    run = _prior(dvae, tmp_path_factory.mktemp("plain"), *FSDP)
    return run, _consolidate(run / "checkpoints" / "last.ckpt", as_a_command=True)


def test_fsdp2_shards_and_trains_the_prior_as_one_process_does_and_its_checkpoint_generates(
    dvae, plain, tmp_path
):
    """Two ranks with batch 4 each against one process with batch 8: each rank holds half of
    the prior's parameters (DTensor shards), the val/loss after 4 steps and the consolidated
    weights agree to float32 round-off (rel 1e-5; the summed gradients differ in order only),
    and the consolidated file generates through evaluate.py; the sharded directory itself is
    refused there with the command that consolidates it."""
    fsdp, full = plain
    one = _prior(dvae, tmp_path / "one", "dataset.batch_size=8")
    logs = _logs(fsdp)
    held = {
        int(r): (int(a), int(b)) for r, a, b in re.findall(r"rank (\d) holds (\d+) of (\d+)", logs)
    }
    assert set(held) == {0, 1}, logs
    total = held[0][1]
    assert held[0][0] + held[1][0] == total  # the shards partition the prior
    assert all(abs(local - total / 2) <= 0.02 * total for local, _ in held.values())
    assert "2 units + 2 fp32 islands + the root sharded over 2 ranks" in logs
    assert "samples" not in {p.name for p in fsdp.iterdir()}  # no sample grids under FSDP2
    assert "attribute accuracy not measured while training: the prior is sharded" in logs

    summary, expected = _metrics(fsdp), _metrics(one)
    assert summary["global_step"] == expected["global_step"] == 4
    assert summary["metrics"]["val/loss"] == pytest.approx(expected["metrics"]["val/loss"], 1e-5)
    assert "val/attributes_seen" not in summary["metrics"]
    assert "val/attributes_seen" in expected["metrics"]  # one process samples

    last = fsdp / "checkpoints" / "last.ckpt"
    assert is_sharded(last) and len(list(last.glob("*.distcp"))) == 2  # one shard per rank
    assert summary["checkpoints"]["last"] == str(last)
    refused = run_script("evaluate.py", "task=generate", f"ckpt_path={last}", "prompts=[a]")
    assert refused.returncode == 2
    assert f"consolidate it first: python -m dalle_lightning.consolidate {last}" in refused.stderr

    ref = torch.load(one / "checkpoints" / "last.ckpt", weights_only=True)
    assert full["global_step"] == 4 and "optimizer_states" not in full
    assert set(full["state_dict"]) == set(ref["state_dict"])  # the keys of a one-device file
    for key, value in ref["state_dict"].items():
        torch.testing.assert_close(full["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)

    out = tmp_path / "generated"
    generated = run_script(
        "evaluate.py",
        "task=generate",
        f"ckpt_path={last}.pt",
        "prompts=[a red circle on the left]",
        "num_images=2",
        f"paths.log_dir={out}",
    )
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert len(list(out.rglob("*.png"))) >= 1


def test_fsdp2_options_change_memory_and_compute_not_the_numbers(dvae, plain, tmp_path):
    """Activation checkpointing (recompute in backward), keeping the gathered weights after
    forward and CPU offload give the plain FSDP2 run's val/loss and weights exactly (fp32, the
    same operations), and save_distributed_checkpoint=false writes one full file with the
    model's own keys (no wrapper prefixes)."""
    plain_run, consolidated = plain
    options = [
        "trainer.strategy.activation_checkpointing=true",
        "trainer.strategy.reshard_after_forward=false",
        "trainer.strategy.cpu_offload=true",
        "trainer.strategy.save_distributed_checkpoint=false",
    ]
    tuned = _prior(dvae, tmp_path / "tuned", *FSDP, *options)
    assert "activation checkpointing True, reshard after forward False, CPU offload True" in (
        _logs(tuned)
    )
    assert _metrics(tuned)["metrics"]["val/loss"] == _metrics(plain_run)["metrics"]["val/loss"]
    full = tuned / "checkpoints" / "last.ckpt"
    assert full.is_file()  # one file, written by rank 0
    state = torch.load(full, weights_only=True)["state_dict"]
    expected = consolidated["state_dict"]
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("strategy", [["trainer=ddp", "trainer.devices=2"], FSDP])
def test_bf16_mixed_runs_on_cpu_with_the_heads_in_fp32(dvae, tmp_path, strategy):
    """trainer.precision=bf16-mixed for 2 steps under DDP (autocast) and FSDP2 (autocast and
    bf16 all-gathered weights): the blocks compute in bf16, the logits come out of the fp32
    islands in fp32 (checked inside the run, on the first step), the loss is finite."""
    run = _prior(
        dvae,
        tmp_path / "bf16",
        *strategy,
        "trainer.precision=bf16-mixed",
        "trainer.max_steps=2",
    )
    logs = _logs(run)
    line = "precision bf16-mixed: blocks compute in torch.bfloat16, logits in torch.float32"
    assert logs.count(line) == 2, logs  # both ranks
    if strategy == FSDP:
        assert "param dtype torch.bfloat16, reduce dtype torch.float32" in logs
    loss = _metrics(run)["metrics"]["val/loss"]
    assert loss is not None and 0 < loss < 10


DVAE_RUN = [
    "model=dvae",
    "model.net.n_hid=8",
    "model.net.n_init=8",
    "model.net.vocab_size=32",
    "dataset.image_size=32",
    "dataset.batch_size=4",
    "dataset.num_train=48",
    "dataset.num_val=8",
    "dataset.num_test=8",
    "dataset.eval_batch_size=8",
    "trainer.accelerator=cpu",
    *EIGHT_STEPS_SAVED_EVERY_4,
    "logger=csv",
    "test=false",
]


def _dvae(tmp_path: Path, name: str, *extra: str) -> Path:
    run = run_script("train.py", *DVAE_RUN, f"paths.log_dir={tmp_path / name}", *extra)
    assert run.returncode == 0, run.stderr[-3000:]
    (path,) = (tmp_path / name / "train_dvae" / "runs").iterdir()
    return path


def test_fsdp2_dvae_resumes_from_its_sharded_checkpoint_with_equal_weights(tmp_path):
    """The dVAE under FSDP2 (each ResBlockGroup a unit, the code-logit and code-reading convs
    fp32 islands): a run resumed from the sharded checkpoint of step 4 continues at step 5 and
    ends with the uninterrupted run's weights, bitwise; both match the DDP run (the same
    per-rank Gumbel noise) to float32 round-off."""
    full = _dvae(tmp_path, "full", *FSDP)
    step4 = full / "checkpoints" / "s4.ckpt"
    assert is_sharded(step4)
    resumed = _dvae(tmp_path, "resumed", *FSDP, f"ckpt_path={step4}")
    assert "resuming from" in _logs(resumed) and "(step 4)" in _logs(resumed)
    assert _metrics(resumed)["resumed_from"]["step"] == 4
    a = _consolidate(full / "checkpoints" / "last.ckpt")
    b = _consolidate(resumed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 8
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    ddp = _dvae(tmp_path, "ddp", "trainer=ddp", "trainer.devices=2")
    ref = torch.load(ddp / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert set(ref) == set(a["state_dict"])
    for key, value in ref.items():
        torch.testing.assert_close(a["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_fsdp2_prior_resumes_from_its_sharded_step_checkpoint_bitwise(dvae, tmp_path):
    """The prior (BPE-dropout off) resumed under FSDP2 from the sharded checkpoint of step 4 of
    an 8-step run ends with that run's weights, bitwise (same max_steps: the LR anneal is a
    function of it)."""
    keep = EIGHT_STEPS_SAVED_EVERY_4
    full = _prior(dvae, tmp_path / "full", *FSDP, *keep)
    step4 = full / "checkpoints" / "s4.ckpt"
    resumed = _prior(dvae, tmp_path / "resumed", *FSDP, *keep, f"ckpt_path={step4}")
    assert _metrics(resumed)["resumed_from"]["step"] == 4
    a = _consolidate(full / "checkpoints" / "last.ckpt")
    b = _consolidate(resumed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 8
    assert a["lr_plateau"] == b["lr_plateau"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
