"""The attribute check while a prior trains (callbacks/attribute_accuracy.py): what it counts,
how ranks split it, that training is the same with it, and where it does not run."""

from __future__ import annotations

import csv
import json
import logging
from types import SimpleNamespace

import pytest
import torch

from dalle_lightning.callbacks.attribute_accuracy import AttributeAccuracy
from dalle_lightning.data.shapes import ShapesDataModule
from dalle_lightning.train import train
from tests.conftest import assert_same
from tests.test_dalle_train import DATA, NET, tiny_module

N = 12  # captions per split


class SummingRanks:
    """A strategy whose reduce adds what every rank has reduced so far (one rank at a time)."""

    def __init__(self):
        self.reduced: list[torch.Tensor] = []

    def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "sum"
        self.reduced.append(tensor.clone())
        return torch.stack(self.reduced).sum(0)


def oracle(shapes: ShapesDataModule, wrong: set[str], asked: list[str]):
    """`generate` that draws, for a caption, a rendered image of it (blank for `wrong` ones)."""
    rendered = {}
    for split in ("val", "heldout"):
        for i in range(N):
            item = shapes.datasets[split][i]
            rendered.setdefault(item["caption"], item["image"])

    def generate(captions, num_images, seed, sampling, batch_size):
        assert num_images == 1 and seed == 5 and batch_size == 3
        asked.extend(captions)
        return torch.stack([rendered[c] * (c not in wrong) for c in captions])

    return generate


@pytest.mark.parametrize("world", [1, 2])
def test_the_check_scores_val_and_heldout_captions_split_over_the_ranks(world):
    """With images that are right except for some captions, the logged accuracies are the
    shares of right ones, the same on every rank; the ranks draw disjoint captions that
    together are the first num_captions of each split."""
    shapes = ShapesDataModule(image_size=64, num_val=N + 4, num_heldout=N + 8)
    shapes.setup()
    captions = {s: [shapes.datasets[s][i]["caption"] for i in range(N)] for s in ("val", "heldout")}
    wrong = {captions["val"][0], captions["val"][5], captions["heldout"][3]}
    expected = {
        f"val/attributes_{name}": sum(c not in wrong for c in captions[split]) / N
        for name, split in (("seen", "val"), ("heldout", "heldout"))
    }
    assert 0 < expected["val/attributes_seen"] < 1 and 0 < expected["val/attributes_heldout"] < 1

    module = tiny_module()
    callback = AttributeAccuracy(num_captions=N, seed=5, batch_size=3)
    strategy, asked, logged = SummingRanks(), [], []
    module.model.generate = oracle(shapes, wrong, asked)
    module.log_dict = lambda values, **kwargs: logged.append(values)
    for rank in range(world):
        trainer = SimpleNamespace(
            sanity_checking=False,
            datamodule=SimpleNamespace(images=shapes),
            global_rank=rank,
            world_size=world,
            strategy=strategy,
            global_step=8,
        )
        callback.on_validation_epoch_end(trainer, module)
    assert sorted(asked) == sorted(captions["val"] + captions["heldout"])
    assert logged[-1] == pytest.approx(expected, abs=0)  # the last rank saw every rank's sum
    if world == 1:  # with the oracle right everywhere, every image passes the checker
        module.model.generate = oracle(shapes, set(), [])
        trainer.strategy = SummingRanks()
        callback.on_validation_epoch_end(trainer, module)
        assert logged[-1] == {"val/attributes_seen": 1.0, "val/attributes_heldout": 1.0}


@pytest.mark.parametrize(
    ("marks", "low"),
    [
        ((0.9, 0.95), ["seen 83.3% (below 90%)", "held-out 91.7% (below 95%)"]),
        ((None, 0.95), ["held-out 91.7% (below 95%)"]),
        ((0.8, 0.9), []),  # at or above both marks
        ((None, None), []),  # no marks: never
    ],
)
def test_a_last_check_below_its_marks_warns_at_the_end_of_training(caplog, marks, low):
    """Seen 10 / 12 and held-out 11 / 12 right: the warning names each share below its mark,
    says what to do, comes once from rank 0 at the end of training, and only about a check of
    the final weights."""
    shapes = ShapesDataModule(image_size=64, num_val=N, num_heldout=N)
    shapes.setup()
    wrong = {shapes.datasets["val"][i]["caption"] for i in (0, 5)}
    wrong.add(shapes.datasets["heldout"][3]["caption"])
    module = tiny_module()
    module.model.generate = oracle(shapes, wrong, [])
    module.log_dict = lambda *args, **kwargs: None
    callback = AttributeAccuracy(N, 5, 3, warn_seen_below=marks[0], warn_heldout_below=marks[1])
    trainer = SimpleNamespace(
        sanity_checking=False,
        datamodule=SimpleNamespace(images=shapes),
        global_rank=0,
        world_size=1,
        strategy=SummingRanks(),
        global_step=40,
        is_global_zero=True,
    )
    caplog.set_level(logging.WARNING)
    callback.on_train_end(trainer, module)  # no check yet: nothing to say
    callback.on_validation_epoch_end(trainer, module)
    assert callback.last == {"seen": 10 / 12, "heldout": 11 / 12}
    # other ranks stay quiet, and nothing is said about weights that trained on after the
    # check (a stop between validations)
    callback.on_train_end(SimpleNamespace(is_global_zero=False, global_step=40), module)
    callback.on_train_end(SimpleNamespace(is_global_zero=True, global_step=41), module)
    assert caplog.records == []
    callback.on_train_end(trainer, module)
    said = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    if not low:
        assert said == [] and callback.verdict() is None
        return
    assert len(said) == 1
    assert said[0].startswith(f"the last attribute check (step 40, {N} captions each) read ")
    assert said[0].split(" read ")[1].split(": ")[0] == ", ".join(low)
    assert "python train.py model=dalle seed=<another>" in said[0]
    assert "task=attributes num_captions=512" in said[0]


def test_not_run_in_the_sanity_check_nor_for_other_data_or_stages(caplog):
    caplog.set_level(logging.INFO)
    module, called = tiny_module(), []
    module.model.generate = lambda *args, **kwargs: called.append(args)
    module.log_dict = lambda *args, **kwargs: called.append(args)
    callback = AttributeAccuracy()
    shapes = SimpleNamespace(images=ShapesDataModule(image_size=64))
    other = SimpleNamespace(images=SimpleNamespace())  # e.g. COCO's datamodule
    for sanity, datamodule, pl_module in [
        (True, shapes, module),
        (False, other, module),
        (False, other, module),
        (False, shapes, SimpleNamespace()),  # stage 1
    ]:
        trainer = SimpleNamespace(sanity_checking=sanity, datamodule=datamodule)
        callback.on_validation_epoch_end(trainer, pl_module)
    assert called == []
    said = [r.message for r in caplog.records if "not measured" in r.message]
    assert said == [
        "attribute accuracy not measured while training: the data is not the built-in shapes "
        "(no attribute records)"
    ]  # once per run


def test_training_is_the_same_with_the_check_and_its_values_reach_the_logs(
    make_cfg, tiny_dvae, tmp_path, caplog
):
    """Sampling in the check draws from its own generator and StepSeed re-seeds every step:
    the weights end bitwise equal with and without it. Its values are in the CSV at every
    validation and in metrics.json."""
    caplog.set_level(logging.INFO)
    runs = {}
    for name, override in (
        ("with", "callbacks.attribute_accuracy.num_captions=8"),
        ("without", "~callbacks.attribute_accuracy"),
    ):
        cfg = make_cfg(
            [
                "model=dalle",
                "trainer.max_steps=4",
                "trainer.val_check_interval=2",
                "logger=csv",
                "test=false",
                override,
                f"model.dvae_ckpt={tiny_dvae}",
                f"paths.cache_dir={tmp_path / 'cache'}",
                *DATA,
                *NET,
            ]
        )
        cfg.paths.output_dir = str(tmp_path / name)
        _, summary = train(cfg)
        runs[name] = summary
    ckpt = {
        name: torch.load(s["checkpoints"]["last"], map_location="cpu", weights_only=True)
        for name, s in runs.items()
    }
    assert_same(ckpt["with"]["state_dict"], ckpt["without"]["state_dict"], "state_dict")
    with_metrics = json.loads((tmp_path / "with" / "metrics.json").read_text())["metrics"]
    without = json.loads((tmp_path / "without" / "metrics.json").read_text())["metrics"]
    assert with_metrics["val/loss"] == without["val/loss"]
    for name in ("seen", "heldout"):
        assert 0 <= with_metrics[f"val/attributes_{name}"] <= 1
        assert f"val/attributes_{name}" not in without
    (csv_file,) = (tmp_path / "with").rglob("metrics.csv")
    rows = [r for r in csv.DictReader(csv_file.open()) if r.get("val/attributes_heldout")]
    assert [int(r["step"]) for r in rows] == [1, 3]  # validations after steps 2 and 4
    said = [r.message for r in caplog.records if "attributes seen" in r.message]
    assert [m.split(":")[0] for m in said] == ["step 2", "step 4"], said  # "with" only
    assert all("(8 captions each" in m for m in said), said  # the override reached it
