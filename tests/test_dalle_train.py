"""Stage 2 end to end on a tiny dVAE made in the test (random weights): token cache, training,
checkpoints that rebuild DALL-E alone, generation, and the user errors."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from dalle_lightning.checkpoints import file_sha256
from dalle_lightning.data.shapes import ShapesDataModule
from dalle_lightning.data.token_datamodule import TokenDataModule
from dalle_lightning.evaluate import evaluate
from dalle_lightning.models.dalle import DALLE
from dalle_lightning.models.dvae import DVAE, DVAEConfig
from dalle_lightning.models.transformer import PriorConfig
from dalle_lightning.modules.dalle_module import DalleModule, expect_frozen_in_eval
from dalle_lightning.modules.losses import PriorLoss
from dalle_lightning.modules.schedules import PriorSchedule
from dalle_lightning.sampling.sampler import SamplingConfig
from dalle_lightning.stage_settings import resolve_dvae_ckpt
from dalle_lightning.text.tokenizer import BPETokenizer, TextConfig
from dalle_lightning.train import train
from tests.conftest import run_script

DATA = [
    "dataset.image_size=32",
    "dataset.batch_size=4",
    "dataset.eval_batch_size=8",
    "dataset.num_train=64",
    "dataset.num_val=16",
    "dataset.num_test=16",
    "trainer.accelerator=cpu",
]
NET = [
    "model.net.dim=32",
    "model.net.depth=2",
    "model.net.heads=2",
    "model.text.vocab_size=64",
    "model.text.text_seq_len=16",
    "model.num_sample_captions=2",
]

SAME_ON_EVERY_RANK = [  # a tiny prior run with no per-rank randomness in the model: caption
    "model=dalle",  # dropout (and so guidance) off; BPE-dropout stays on: it is drawn per item
    # by (seed, epoch, index), the same whichever rank takes the item; 4 steps, validated at 2, 4
    "model.caption_dropout=0",
    "model.sampling.cond_scale=1",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "logger=csv",
    "test=false",
    *DATA,
    *NET,
]


def shapes(n: int = 24) -> ShapesDataModule:
    return ShapesDataModule(
        image_size=32, num_train=n, num_val=8, num_test=8, batch_size=4, eval_batch_size=8
    )


def tiny_module(
    schedule: PriorSchedule = PriorSchedule(),
    loss: PriorLoss = PriorLoss(),
    text_seq_len: int = 8,
    **options,
) -> DalleModule:
    """A one-layer prior over an in-memory random dVAE (32 px -> 8 x 8 codes from 32) and a
    BPE tokenizer learned from a few captions: no file on disk."""
    torch.manual_seed(0)
    dvae = DVAE(DVAEConfig(image_size=32, n_hid=8, n_init=8, vocab_size=32))
    captions = ["a red circle on the left", "a large blue square", "a small green triangle"]
    tokenizer = BPETokenizer.train(captions, 64, text_seq_len)
    net = PriorConfig(
        text_vocab=64,
        text_seq_len=text_seq_len,
        image_vocab=32,
        grid_size=8,
        dim=16,
        depth=1,
        heads=2,
    )
    return DalleModule(net, dvae, tokenizer, loss, schedule, **options)


def test_the_module_is_built_from_objects_in_memory_and_learns():
    """DalleModule takes a dVAE, a tokenizer and typed configs, nothing from disk: its loss
    falls on a fixed batch, and its model generates images for captions right away."""
    module = tiny_module(schedule=PriorSchedule(warmup_steps=0))
    module.log_dict = lambda *args, **kwargs: None  # no trainer to log to
    text = module.model.tokenizer.encode(["a red circle on the left", "a large blue square"])
    batch = {"text": text, "codes": torch.randint(0, 32, (2, 64), generator=torch.Generator())}
    optimizer = torch.optim.AdamW(module.model.prior.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = module.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in module.model.dvae.parameters())  # frozen
    images = module.model.generate(["a red circle on the left"], 2, seed=0)
    assert images.shape == (2, 3, 32, 32)


def test_token_cache_holds_the_dvae_codes_and_is_reused(tiny_dvae, tmp_path, monkeypatch):
    dvae = DVAE.from_checkpoint(tiny_dvae)
    sha = file_sha256(tiny_dvae)
    text = TextConfig(vocab_size=64, text_seq_len=16)
    dm = TokenDataModule(shapes(), dvae, sha, str(tmp_path / "cache"), text)
    dm.setup()
    tokens = dm.split_tokens("train")
    dm.split_tokens("val")
    images = torch.stack([dm.images.datasets["train"][i]["image"] for i in range(24)])
    assert torch.equal(tokens["codes"].long(), dvae.encode(images))
    assert tokens["captions"][3] == dm.images.datasets["train"][3]["caption"]
    files = sorted(p.name for p in (tmp_path / "cache").glob("*.pt"))  # not .sha256, .lock
    assert len([f for f in files if f.startswith("train-")]) == 1

    # a second run reads the files: no dVAE encoding, the same tokenizer ids
    def no_encoding(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr("dalle_lightning.data.token_cache.encode_dataset", no_encoding)
    again = TokenDataModule(shapes(), dvae, sha, str(tmp_path / "cache"), text)
    again.setup()
    assert torch.equal(again.split_tokens("train")["codes"], tokens["codes"])
    batch = next(iter(again.val_dataloader()))
    assert torch.equal(batch["text"], dm.tokenizer.encode(batch["caption"]))
    assert batch["codes"].shape == (8, 64)

    # another dVAE (or other data) gets its own cache files
    with pytest.raises(AssertionError, match="reused"):
        TokenDataModule(shapes(), dvae, "0" * 64, str(tmp_path / "cache"), text).setup()
    with pytest.raises(AssertionError, match="reused"):
        TokenDataModule(shapes(n=25), dvae, sha, str(tmp_path / "cache"), text).setup()


def test_bpe_dropout_in_the_training_loader_only(tiny_dvae, tmp_path):
    dvae = DVAE.from_checkpoint(tiny_dvae)
    text = TextConfig(vocab_size=64, text_seq_len=32, bpe_dropout=1.0)
    dm = TokenDataModule(shapes(), dvae, file_sha256(tiny_dvae), str(tmp_path), text)
    dm.setup()
    train_batch = next(iter(dm.train_dataloader()))
    val_batch = next(iter(dm.val_dataloader()))
    # dropout 1.0: every merge is dropped, one id per letter
    letters = [sum(c.isalpha() for c in caption) for caption in train_batch["caption"]]
    lengths = (train_batch["text"] < 64).sum(1).tolist()
    assert lengths == [min(n, 32) for n in letters]
    assert torch.equal(val_batch["text"], dm.tokenizer.encode(val_batch["caption"]))


def test_fast_dev_run_dalle(make_cfg, tiny_dvae, tmp_path, recwarn):
    cfg = make_cfg(["model=dalle", "debug=fdr", f"model.dvae_ckpt={tiny_dvae}", *DATA, *NET])
    value, summary = train(cfg)
    # the frozen dVAE is in eval mode by design: Lightning's warning about it is silenced
    assert not [w for w in recwarn if "in eval mode" in str(w.message)]
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    for key in ("train/text_loss", "train/image_loss", "val/loss", "test/image_loss"):
        assert metrics[key] is not None, key
    assert value == metrics["val/loss"]
    # untrained: about ln(vocabulary) per token
    assert abs(metrics["val/image_loss"] - torch.tensor(32.0).log().item()) < 0.5


def test_only_the_frozen_dvae_in_eval_mode_is_expected():
    """Lightning's eval-mode warning is silenced for the frozen dVAE's modules alone: with a
    prior block in eval mode too, the count differs and the warning stays."""
    message = "Found {} module(s) in eval mode at the start of training."
    module = tiny_module()
    frozen = sum(1 for _ in module.model.dvae.modules())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.model.dvae.eval()
        expect_frozen_in_eval(module, "model.dvae")
        warnings.warn(message.format(frozen), PossibleUserWarning, stacklevel=1)
        assert not caught
        module.model.prior.blocks[0].eval()
        expect_frozen_in_eval(module, "model.dvae")  # not only the dVAE: nothing silenced
        in_eval = sum(not m.training for m in module.modules())
        assert in_eval > frozen
        warnings.warn(message.format(in_eval), PossibleUserWarning, stacklevel=1)
        assert [str(w.message) for w in caught] == [message.format(in_eval)]


def test_training_checkpoint_rebuilds_dalle_and_generates(
    make_cfg, tiny_dvae, tmp_path, monkeypatch
):
    cfg = make_cfg(
        [
            "model=dalle",
            "debug=limit",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            f"model.dvae_ckpt={tiny_dvae}",
            *DATA,
            *NET,
        ]
    )
    _, summary = train(cfg)
    ckpt = summary["checkpoints"]["last"]
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert raw["prior_config"]["grid_size"] == 8 and raw["prior_config"]["image_vocab"] == 32
    # the default anneal (last 40% of trainer.max_steps) has brought the LR to 0 at step 4
    assert raw["lr_schedulers"][0]["_last_lr"] == [0.0, 0.0]
    assert (tmp_path / "tokenizer.json").is_file()
    assert (tmp_path / "samples" / "step_0000004.png").is_file()
    assert len((tmp_path / "samples" / "captions.txt").read_text().splitlines()) == 2

    model = DALLE.from_checkpoint(ckpt)
    # model=dalle's sampling settings and caption dropout travel with the checkpoint
    assert model.sampling == SamplingConfig(temperature=0.5, top_p=0.9, cond_scale=1.5)
    assert model.caption_dropout == cfg.model.caption_dropout == 0.1
    images = model.generate(["a red circle on the left"], num_images=3, seed=1)
    assert images.shape == (3, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, model.generate(["a red circle on the left"], 3, seed=1))

    gen_dir = tmp_path / "gen"
    ecfg = make_cfg(
        [
            "task=generate",
            f"ckpt_path={ckpt}",
            'prompts=["a red circle on the left","a blue square"]',
            "num_images=2",
        ],
        config_name="evaluate",
    )
    ecfg.paths.output_dir = str(gen_dir)
    result = evaluate(ecfg)
    pngs = [Path(g["png"]) for g in result["generated"]]
    assert [p.name for p in pngs] == ["000_a_red_circle_on_the_left.png", "001_a_blue_square.png"]
    assert all(p.is_file() for p in pngs)
    gen_metrics = json.loads((gen_dir / "metrics.json").read_text())
    assert gen_metrics["generated"][1]["prompt"] == "a blue square"
    # evaluate.yaml leaves sampling null: the checkpoint's settings were used and recorded
    assert gen_metrics["sampling"] == {**asdict(model.sampling), "batch_size": 64}

    # attribute accuracy: real images are the checker's reference (100%); a random dVAE and
    # an untrained prior draw nothing recognisable
    acc_dir = tmp_path / "acc"
    acfg = make_cfg(
        [
            "task=attributes",
            f"ckpt_path={ckpt}",
            "num_captions=6",
            "dataset.image_size=32",
            "sampling.cond_scale=1",  # given values win over the checkpoint's
            "sampling.batch_size=4",
        ],
        config_name="evaluate",
    )
    acfg.paths.output_dir = str(acc_dir)
    batch_sizes = []
    generate = DALLE.generate

    def recording(self, *args, **kwargs):
        batch_sizes.append(kwargs.get("batch_size"))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(DALLE, "generate", recording)
    summary = evaluate(acfg)
    assert batch_sizes == [4, 4]  # sampling.batch_size reaches the generation of both splits
    assert summary["sampling"]["cond_scale"] == 1 and summary["sampling"]["temperature"] == 0.5
    result = summary["attributes"]
    for name in ("seen", "heldout"):
        assert result[name]["real"]["accuracy"] == 1.0
        assert result[name]["generated"]["accuracy"] < 0.5
        assert (acc_dir / f"attributes_{name}.png").is_file()
    assert result["heldout"]["split"] == "heldout" and result["seen"]["num_captions"] == 6


def test_newest_finished_dvae_run_is_found(tiny_dvae, tmp_path):
    for name, ckpt in (("old", tiny_dvae), ("unfinished", None)):
        run = tmp_path / "logs" / "train_dvae" / "runs" / name
        run.mkdir(parents=True)
        if ckpt:
            summary = {"checkpoints": {"best": str(ckpt), "last": None}}
            (run / "metrics.json").write_text(json.dumps(summary))
    assert resolve_dvae_ckpt(None, str(tmp_path / "logs")) == tiny_dvae


def test_without_a_dvae_one_line_says_train_it_first(tmp_path):
    result = run_script("train.py", "model=dalle", f"paths.log_dir={tmp_path}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: model.dvae_ckpt=None is invalid")
    assert "python train.py model=dvae" in lines[-1]


def test_generate_needs_prompts(tmp_path):
    result = run_script("evaluate.py", "task=generate", f"paths.log_dir={tmp_path}")
    assert result.returncode == 2
    assert "error: prompts=None is invalid: a non-empty list of captions" in result.stderr


def test_learning_rate_warms_up_then_halves_on_plateaus():
    module = tiny_module(PriorSchedule(warmup_steps=10, plateau_patience=1, max_lr_halvings=2))
    factor = module.lr_factor(max_steps=0)
    assert factor(0) == pytest.approx(0.1) and factor(9) == 1.0
    for val_loss in (3.0, 2.0, 1.5, 1.0):  # improving: never halved
        module.plateau.update(val_loss)
    assert module.plateau.halvings == 0
    module.plateau.update(1.0)  # one validation without improvement: within patience
    assert module.plateau.halvings == 0
    assert module.plateau.update(1.2)  # two: halve
    assert module.plateau.halvings == 1 and factor(100) == 0.5
    for _ in range(10):
        module.plateau.update(5.0)
    assert module.plateau.halvings == 2  # at most max_lr_halvings


def test_learning_rate_anneals_over_the_last_fraction_of_the_run():
    module = tiny_module(PriorSchedule(warmup_steps=10, anneal_fraction=0.4))
    factors = [module.lr_factor(max_steps=100)(step) for step in range(101)]
    assert factors[9:61] == [1.0] * 52  # warm, constant until the last 40 steps
    assert factors[80] == pytest.approx(0.5)  # half-way down the half cosine
    assert all(a > b for a, b in zip(factors[60:], factors[61:], strict=False))
    assert factors[100] == 0.0
    module.plateau.halvings = 1  # plateau halvings still apply on top
    assert module.lr_factor(max_steps=100)(80) == pytest.approx(0.25)
    assert module.lr_factor(max_steps=0)(80) == 0.5  # no max_steps: no anneal


@pytest.mark.parametrize("caption_dropout", [0.0, 0.5, 1.0])
def test_caption_dropout_blanks_whole_captions_in_training_only(caption_dropout):
    module = tiny_module(loss=PriorLoss(caption_dropout=caption_dropout), text_seq_len=6)
    seen = []
    module._losses = lambda batch, stage: seen.append(batch["text"]) or torch.zeros(())
    text = torch.randint(0, 64, (400, 6))
    torch.manual_seed(0)
    module.training_step({"text": text, "codes": torch.zeros(400, 64, dtype=torch.long)}, 0)
    blank = torch.arange(64, 70)
    blanked = (seen[0] == blank).all(1)
    assert torch.equal(seen[0][~blanked], text[~blanked])  # the others are untouched
    assert abs(blanked.float().mean().item() - caption_dropout) < 0.08


def test_weight_decay_skips_gains_biases_and_embeddings():
    module = tiny_module()
    # configure_optimizers reads trainer.model and trainer.max_steps
    module.trainer = type("T", (), {"model": module, "max_steps": 100})()
    optimizer = module.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    linear_weights = {
        id(m.weight) for m in module.model.prior.modules() if isinstance(m, torch.nn.Linear)
    }
    assert {id(p) for p in decay["params"]} == linear_weights
    assert no_decay["weight_decay"] == 0.0
    assert id(module.model.prior.text_embedding.weight) in {id(p) for p in no_decay["params"]}
    assert all(p.requires_grad for p in no_decay["params"])  # the frozen dVAE is not optimised


def test_truncation_is_reported_once_per_run(tiny_dvae, tmp_path, caplog):
    dvae = DVAE.from_checkpoint(tiny_dvae)
    text = TextConfig(vocab_size=64, text_seq_len=4)
    dm = TokenDataModule(shapes(), dvae, file_sha256(tiny_dvae), str(tmp_path), text)
    with caplog.at_level("WARNING"):
        dm.setup("fit")
        dm.setup("test")  # Lightning calls setup again for trainer.test
    warnings = [r.message for r in caplog.records if "are truncated" in r.getMessage()]
    assert len(warnings) == 1


def test_ddp_on_two_cpu_processes_matches_one_process_and_its_checkpoint_generates(
    tiny_dvae, tmp_path
):
    """trainer=ddp: two processes (gloo) with batch 2 each train the prior as one process with
    batch 4 does (same global batches, averaged gradients); rank 0 writes the run, and its
    checkpoint loads on one device."""
    same = [
        *SAME_ON_EVERY_RANK,
        f"model.dvae_ckpt={tiny_dvae}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    ddp = run_script(
        "train.py", *same, "trainer=ddp", "trainer.devices=2", f"paths.log_dir={tmp_path / 'ddp'}"
    )
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    # DATA's batch_size=4 per device x 2 devices, in one process
    one = run_script("train.py", *same, "dataset.batch_size=8", f"paths.log_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    (run,) = (tmp_path / "ddp" / "train_dalle" / "runs").iterdir()
    (single,) = (tmp_path / "one" / "train_dalle" / "runs").iterdir()
    summary = json.loads((run / "metrics.json").read_text())
    expected = json.loads((single / "metrics.json").read_text())
    assert summary["metrics"]["val/loss"] == pytest.approx(expected["metrics"]["val/loss"], 1e-5)
    # the attribute check ran under two gloo ranks (its split: tests/test_attribute_accuracy.py)
    for name in ("seen", "heldout"):
        assert 0 <= summary["metrics"][f"val/attributes_{name}"] <= 1
    raw = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ref = torch.load(single / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert raw["global_step"] == ref["global_step"] == 4
    moved = 0
    for key, value in ref["state_dict"].items():
        torch.testing.assert_close(raw["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        moved += not key.startswith("model.dvae")
    assert moved > 10
    # rank 0 learns the BPE (TokenDataModule.prepare_data) while rank 1 waits, then loads it:
    # two ranks learning their own could break ties differently
    logs = "".join(f.read_text() for f in run.glob("*.log"))
    assert logs.count("BPE tokenizer: ") == 2 and logs.count(" ids learned ") == 1, logs
    model = DALLE.from_checkpoint(run / "checkpoints" / "last.ckpt")  # one device, no DDP
    images = model.generate(["a red circle on the left"], num_images=2, seed=0)
    assert images.shape == (2, 3, 32, 32)
