"""`python -m dalle_lightning.gpu_check`: its CPU parts run here (tiny), and a mismatch with the
CPU reference exits non-zero. The GPU parts run only where a GPU is (docs/scaling.md)."""

from __future__ import annotations

import pytest

from dalle_lightning import gpu_check

TINY = ["--device", "cpu", "--dim", "64", "--depth", "2", "--heads", "4", "--batch", "2"]


def test_cpu_parts_agree_with_the_fp32_reference():
    report = gpu_check.main([*TINY, "--steps", "3"])
    assert report["problems"] == []
    agreement = report["agreement"]
    assert agreement["cpu bf16-mixed"] == pytest.approx(agreement["cpu 32-true"], rel=5e-2)
    assert report["speed"]["bf16-mixed"]["tokens_per_s"] > 0
    assert report["fsdp2"].startswith("skipped")
    decoding = report["decoding"]  # the static step equals the KV decoder on the CPU too
    assert set(decoding) == {"kv_decoder", "static"}  # compiled: GPU only
    assert decoding["static"]["max_diff"] < 1e-5 and decoding["static"]["images_per_s"] > 0


def test_a_mismatch_exits_1_and_names_it(monkeypatch, capsys):
    """A drifting bf16 loss in part 1 is named and exits 1. Parts 2 and 4 (speed, decoding) are
    left out: the problem checked is part 1's, and they cost most of the run on a CPU."""
    real = gpu_check.train_steps
    monkeypatch.setattr(gpu_check, "speed", lambda *args: {})
    monkeypatch.setattr(gpu_check, "decoding", lambda *args: {})

    def drifting(config, batch, device, precision, steps, seed=0):
        run = real(config, batch, device, precision, steps, seed)
        if precision == "bf16-mixed":
            run["losses"][-1] *= 1.5  # what a broken mixed-precision path would give
        return run

    monkeypatch.setattr(gpu_check, "train_steps", drifting)
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main([*TINY, "--steps", "2"])
    assert exit_info.value.code == 1
    assert "cpu bf16-mixed: loss" in capsys.readouterr().err
