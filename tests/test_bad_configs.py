"""Bad config values fail before any work, with one line naming the field, value and what is
allowed (the entry scripts print it and exit 2: tests/test_train.py runs a few through the CLI)."""

from __future__ import annotations

import json
import sys

import pytest

from dalle_lightning.config import ConfigError
from dalle_lightning.evaluate import evaluate
from dalle_lightning.preflight import check_evaluate, check_train
from dalle_lightning.train import train
from tests.conftest import ROOT, run_command

SMALL = ["dataset.num_val=8", "dataset.num_test=8", "trainer.max_steps=2", "logger=none"]


BAD_TRAIN = [
    ("seed=-1", "seed", "[0, 2**32)"),
    ("test=maybe", "test", "true or false"),
    ("resume=1", "resume", "true or false"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches", ">= 1"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps", ">= 1"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val", ">= 0"),
    ("trainer.precision=17", "trainer.precision", "16-mixed"),
    ("trainer.devices=0", "trainer.devices", ">= 1"),
    ("trainer.accelerator=cpu trainer.precision=16-mixed", "trainer.precision", "bf16-mixed"),
    ("trainer=fsdp trainer.devices=1", "trainer.devices", "2 or more with trainer=fsdp"),
    (
        "trainer=fsdp trainer.devices=4 trainer.strategy.tensor_parallel_size=3",
        "trainer.strategy.tensor_parallel_size",
        "a divisor of the 4 ranks",
    ),
    (
        "trainer=fsdp trainer.strategy.tensor_parallel_size=2",
        "trainer.strategy.tensor_parallel_size",
        "no tensor-parallel plan",
    ),
    ("trainer=fsdp trainer.strategy.param_dtype=fp8", "trainer.strategy.param_dtype", "bf16"),
    ("model=clip trainer=fsdp", "trainer", "ddp for model=clip"),
    (
        "model=dalle trainer=fsdp trainer.strategy.cpu_offload=maybe",
        "trainer.strategy.cpu_offload",
        "true or false",
    ),
    ("model.optimizer.lr=0", "model.optimizer.lr", ">= 1e-12"),
    ("model.optimizer.weight_decay=-1", "model.optimizer.weight_decay", ">= 0"),
    ("model.optimizer.betas=[0.9]", "model.optimizer.betas", "two numbers"),
    ("model.tau_end=2", "model.tau_end", "[0.0001, 1.0]"),
    ("model.recon_loss=l1", "model.recon_loss", "logit_laplace, mse"),
    ("optimized_metric=val/nope", "optimized_metric", "val/psnr"),
    ("dataset.batch_size=0", "dataset.batch_size", ">= 1"),
    ("callbacks.nonfinite_guard.max_in_row=0", "callbacks.nonfinite_guard.max_in_row", ">= 1"),
    ("callbacks.model_checkpoint.save_top_k=-2", "callbacks.model_checkpoint", "save_top_k"),
    (
        "callbacks.attribute_accuracy.num_captions=0",
        "callbacks.attribute_accuracy.num_captions",
        ">= 1",
    ),
    (
        "callbacks.attribute_accuracy.warn_heldout_below=70",
        "callbacks.attribute_accuracy.warn_heldout_below",
        "[0.0, 1.0]",
    ),
    ("ckpt_path=/no/such.ckpt", "ckpt_path", "an existing checkpoint file"),
    ("resume=true ckpt_path=/no/such.ckpt", "resume", "one or the other"),
    ("model=clip model.optimizer.lr=-1", "model.optimizer.lr", ">= 1e-12"),
    ("model=dalle model.dvae_ckpt=/no/dvae.ckpt", "model.dvae_ckpt", "dVAE checkpoint"),
    ("model=dalle model.anneal_fraction=2", "model.anneal_fraction", "[0.0, 1.0]"),
    ("model.decoder_only_from=0", "model.decoder_only_from", ">= 1"),
    ("model._target_=torch.nn.Linear", "model._target_", "dvae_module.DVAEModule, dalle_"),
    (
        "model=dalle model.caption_dropout=0 model.sampling.cond_scale=2",
        "model.sampling.cond_scale",
        "model.caption_dropout=0.1",
    ),
    (
        "model=dalle model.anneal_fraction=0.5 trainer.max_steps=-1 trainer.max_epochs=1",
        "model.anneal_fraction",
        "trainer.max_steps",
    ),
]
# checked while the objects are built, after Lightning is imported: the rest is refused before
BUILT = {"optimized_metric", "dataset.batch_size", "callbacks.nonfinite_guard.max_in_row"}
BUILT |= {"callbacks.model_checkpoint", "model._target_"}
BUILT |= {
    "callbacks.attribute_accuracy.num_captions",
    "callbacks.attribute_accuracy.warn_heldout_below",
}


@pytest.mark.parametrize(("override", "field", "allowed"), BAD_TRAIN)
def test_bad_value_fails_before_any_work(make_cfg, tmp_path, override, field, allowed):
    cfg = make_cfg([*SMALL, *override.split(" ")])
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert err.value.field == field
    message = str(err.value)
    assert "\n" not in message and allowed in message
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("option", ["coco", "cub", "folder"])
def test_a_missing_dataset_root_is_refused_by_the_checks_before_lightning(
    make_cfg, tmp_path, option
):
    """train.py and evaluate.py run these checks before importing Lightning (the fresh-process
    test below): a mistyped `dataset.root` fails there, in seconds, not after the import."""
    cfg = make_cfg([f"dataset={option}", f"dataset.root={tmp_path / 'absent'}", "logger=none"])
    with pytest.raises(ConfigError, match=r"^dataset.root=.*absent.*an existing folder") as err:
        check_train(cfg)
    assert err.value.field == "dataset.root"
    with pytest.raises(ConfigError, match="^dataset.root="):
        train(cfg)
    root = f"dataset.root={tmp_path / 'absent'}"
    cfg = make_cfg(["task=reference_stats", f"dataset={option}", root], config_name="evaluate")
    with pytest.raises(ConfigError, match="^dataset.root=.*absent"):
        check_evaluate(cfg)
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.json"))


BAD_EVALUATE = [
    ("task=nope", "task"),
    ("seed=-3", "seed"),
    ("trust_checkpoint=maybe", "trust_checkpoint"),
    ("task=generate num_images=0 prompts=[a]", "num_images"),
    ("task=generate prompts=[]", "prompts"),
    ("task=generate sampling.cond_scale=-1 prompts=[a]", "sampling.cond_scale"),
    ("task=reconstruction split=nope", "split"),
]


@pytest.mark.parametrize(("override", "field"), BAD_EVALUATE)
def test_bad_evaluate_value_fails_before_any_work(make_cfg, tmp_path, override, field):
    cfg = make_cfg(override.split(" "), config_name="evaluate")
    with pytest.raises(ConfigError) as err:
        evaluate(cfg)
    assert err.value.field == field
    assert not list(tmp_path.rglob("*.png")) and not (tmp_path / "metrics.json").exists()


CHECK_IN_A_FRESH_PROCESS = """
import json, sys
from pathlib import Path
from dalle_lightning.config import ConfigError
from dalle_lightning.preflight import check_evaluate, check_train
from tests.conftest import compose_config

cases, small, out = json.loads(sys.argv[1]), sys.argv[2].split(" "), Path(sys.argv[3])
refused = []
for i, (name, override) in enumerate(cases):
    cfg = compose_config(name, [*small, *override.split(" ")], out / str(i))
    try:
        check_train(cfg) if name == "train" else check_evaluate(cfg)
        refused.append(None)
    except ConfigError as err:
        refused.append(err.field)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "torchmetrics"))
print(json.dumps({"refused": refused, "loaded": loaded}))
"""


def test_the_scripts_refuse_bad_values_before_importing_lightning(tmp_path):
    """train.py and evaluate.py check what needs no built object (`preflight.py`) before they
    import Lightning, the larger part of a refusal's time: run in a fresh process, the checks
    refuse every bad value above except those of built objects, and Lightning stays
    unimported."""
    cases = [("train", o) for o, _, _ in BAD_TRAIN] + [("evaluate", o) for o, _ in BAD_EVALUATE]
    args = [json.dumps(cases), " ".join(SMALL), str(tmp_path)]
    done = run_command([sys.executable, "-c", CHECK_IN_A_FRESH_PROCESS, *args], cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    expected = [None if f in BUILT else f for _, f, _ in BAD_TRAIN]
    expected += [field for _, field in BAD_EVALUATE]
    assert result["refused"] == expected
