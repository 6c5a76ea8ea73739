"""`python train.py` end to end: runs, run directories, metrics.json, checkpoints, user errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from omegaconf import open_dict

from dalle_lightning.evaluate import evaluate
from dalle_lightning.models.dvae import DVAE
from dalle_lightning.train import train
from tests.conftest import run_command, run_script

TINY = [
    "model.net.n_hid=8",
    "model.net.n_init=8",
    "model.net.vocab_size=32",
    "dataset.image_size=32",
    "dataset.batch_size=4",
    "dataset.eval_batch_size=8",
    "dataset.num_val=16",
    "dataset.num_test=16",
    "trainer.accelerator=cpu",
]


def test_fast_dev_run_dvae(make_cfg, tmp_path):
    cfg = make_cfg(["model=dvae", "debug=fdr", *TINY])
    value, summary = train(cfg)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["global_step"] == 1
    for key in ("train/loss", "val/loss", "val/psnr", "val/codebook_used", "test/psnr"):
        assert key in written["metrics"], key
    assert value == written["metrics"]["val/loss"] and value is not None
    assert 0 < written["metrics"]["val/codebook_used"] <= 1


def test_short_run_checkpoints_load_and_evaluate(make_cfg, tmp_path):
    cfg = make_cfg(["debug=limit", "trainer.max_steps=6", "trainer.val_check_interval=3", *TINY])
    _, summary = train(cfg)
    ckpts = summary["checkpoints"]
    assert ckpts["last"].endswith("checkpoints/last.ckpt") and ckpts["best"]
    # untrusted-file safe: the Lightning checkpoint loads with weights_only=True
    raw = torch.load(ckpts["last"], map_location="cpu", weights_only=True)
    assert raw["global_step"] == 6 and raw["dvae_config"]["vocab_size"] == 32
    model = DVAE.from_checkpoint(ckpts["best"])
    assert model.encode(torch.rand(2, 3, 32, 32)).shape == (2, 4, 4)  # 32 px / 8x downsampling
    # TensorBoard event file and the reconstruction grid PNG are written
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (
        sorted(p.name for p in (tmp_path / "reconstructions").glob("*.png"))[-1]
        == "step_0000006.png"
    )
    assert (tmp_path / "csv" / "metrics.csv").is_file()

    eval_dir = tmp_path / "eval"
    ecfg = make_cfg(
        ["task=reconstruction", "split=heldout", f"ckpt_path={ckpts['last']}", *TINY],
        config_name="evaluate",
    )
    with open_dict(ecfg):
        ecfg.paths.output_dir = str(eval_dir)
    result = evaluate(ecfg)
    on_disk = json.loads((eval_dir / "metrics.json").read_text())
    assert (
        on_disk["split"] == "heldout"
        and on_disk["metrics"]["test/psnr"] == result["metrics"]["test/psnr"]
    )


def test_decoder_only_phase_leaves_the_encoder_as_it_was(make_cfg, tmp_path):
    """From model.decoder_only_from on, the decoder trains alone: the encoder's weights (and
    so the codes the prior learns) stay those of the step before the phase."""
    cfg = make_cfg(
        [
            "debug=limit",
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            "model.decoder_only_from=3",
            "callbacks.model_checkpoint.save_top_k=-1",  # keep step 3 and step 6
            "test=false",
            *TINY,
        ]
    )
    train(cfg)
    at = {
        step: torch.load(tmp_path / "checkpoints" / f"best-step{step:07d}.ckpt")["state_dict"]
        for step in (3, 6)
    }
    encoder = [k for k in at[3] if k.startswith("net.encoder.")]
    decoder = [k for k in at[3] if k.startswith("net.decoder.")]
    assert encoder and decoder
    assert all(torch.equal(at[3][k], at[6][k]) for k in encoder)
    assert not all(torch.equal(at[3][k], at[6][k]) for k in decoder)


def test_overfit_debug_config_learns(make_cfg):
    cfg = make_cfg(
        [
            "debug=overfit",
            "trainer.max_steps=100",
            "model.optimizer.lr=1e-2",
            "model.kl_warmup_steps=1000",
            "model.temp_anneal_steps=100",  # hard codes at the end, as validation uses them
            "model.net.group_count=3",  # 8 x 8 codes of 32 px: 100 steps at lr 1e-2 suffice
            "model.lr_warmup_steps=0",
            "logger=none",
            "callbacks=none",
            "test=false",
            *TINY,
        ]
    )
    _, summary = train(cfg)
    metrics = summary["metrics"]
    assert metrics["val/psnr"] > 14, metrics


def _one_line_error(result, *needles: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_cli_rejects_negative_max_steps(tmp_path):
    result = run_script("train.py", "trainer.max_steps=-5", f"paths.log_dir={tmp_path}")
    _one_line_error(result, "trainer.max_steps=-5", "integer")
    assert not list(tmp_path.rglob("*.ckpt"))


def test_cli_rejects_image_size_the_dvae_cannot_divide(tmp_path):
    result = run_script("train.py", "dataset.image_size=50", f"paths.log_dir={tmp_path}")
    _one_line_error(result, "model.net.image_size=50", "multiple of 8")


def test_cli_rejects_unknown_dataset_and_model(tmp_path):
    result = run_script("train.py", "dataset=imagenet", f"paths.log_dir={tmp_path}")
    _one_line_error(result, "dataset='imagenet'", "one of coco, cub, folder, shapes")
    result = run_script("train.py", "-m", "model=dvae,vqgan", f"paths.log_dir={tmp_path}")
    _one_line_error(result, "model='vqgan'", "dvae")


def test_the_command_line_is_checked_before_lightning_is_imported():
    """A mistyped group option or an unusable log dir fails in ~1 s, not after Lightning's
    ~3 s import: the entry scripts (demo.py too) load it inside `main`, once Hydra has composed."""
    imports = "import sys, train, evaluate, demo"
    code = f"{imports}; print([m for m in sys.modules if m.startswith('lightning')])"
    done = run_command([sys.executable, "-c", code])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without GPU")
def test_cli_rejects_gpu_trainer_without_gpu(tmp_path):
    result = run_script("train.py", "experiment=paper_dvae", f"paths.log_dir={tmp_path}")
    _one_line_error(result, "trainer.accelerator='gpu'", "trainer=cpu")


def test_cli_rejects_unknown_model_key(tmp_path):
    result = run_script("train.py", "+model.net.depth=3", f"paths.log_dir={tmp_path}")
    _one_line_error(result, "model.net", "depth")


def test_multirun_makes_one_run_dir_per_value(tmp_path):
    result = run_script(
        "train.py",
        "-m",
        "model=dvae",
        "model.net.n_hid=8,16",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "dataset.num_val=8",
        "dataset.num_test=8",
        "dataset.batch_size=4",
        "dataset.image_size=32",
        "callbacks=none",
        f"paths.log_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(tmp_path.glob("train_dvae/multiruns/*/*/metrics.json"))
    assert [p.parent.name for p in runs] == ["0", "1"]
    n_hids = [json.loads(p.read_text())["overrides"] for p in runs]
    assert ["model.net.n_hid=8" in n_hids[0], "model.net.n_hid=16" in n_hids[1]] == [True, True]


def test_lightning_lines_are_printed_once_and_kept_in_the_run_log(tmp_path):
    """Lightning's own console handler and Hydra's printed each of its lines twice; its tips,
    torch's LeafSpec FutureWarning and the `limit_*_batches=1.0` notes said nothing about the
    run (lightning_messages.py, conf/trainer/default.yaml)."""
    result = run_script(
        "train.py",
        *TINY,
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        f"paths.log_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    assert console.count("GPU available:") == 1, console[-3000:]
    assert console.count("Restoring states from the checkpoint path") == 1  # the test's
    for noise in ("Tip:", "litlogger", "LeafSpec", "was configured so"):
        assert noise not in console, noise
    (log_file,) = tmp_path.glob("train_dvae/runs/*/train_dvae.log")
    assert log_file.read_text().count("GPU available:") == 1  # still in the run's log


def test_ema_callback_trains_and_checkpoints(make_cfg):
    cfg = make_cfg(
        [
            "debug=limit",
            "callbacks=[default,ema]",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "callbacks.ema.decay=0.5",
            *TINY,
        ]
    )
    _, summary = train(cfg)
    ckpt = torch.load(summary["checkpoints"]["last"], map_location="cpu", weights_only=True)
    # the averaged weights are what the checkpoint holds, and they still rebuild the dVAE
    assert any("EMAWeightAveraging" in key for key in ckpt["callbacks"])
    model = DVAE.from_checkpoint(summary["checkpoints"]["last"])
    assert model.encode(torch.rand(1, 3, 32, 32)).shape == (1, 4, 4)  # 32 px / 8x downsampling


def test_early_stopping_ends_the_run_when_validation_stops_improving(make_cfg):
    """callbacks=[default,early_stopping]: with a min_delta no change can beat, the first
    validation sets the best value, the next one does not improve on it, and patience 1 stops
    the run there (step 4 of 20)."""
    cfg = make_cfg(
        [
            "debug=limit",
            "callbacks=[default,early_stopping]",
            "callbacks.early_stopping.patience=1",
            "callbacks.early_stopping.min_delta=1e9",
            "trainer.max_steps=20",
            "trainer.val_check_interval=2",
            *TINY,
        ]
    )
    _, summary = train(cfg)
    assert summary["global_step"] == 4
    ckpt = torch.load(summary["checkpoints"]["last"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    assert any("EarlyStopping" in key for key in ckpt["callbacks"])
