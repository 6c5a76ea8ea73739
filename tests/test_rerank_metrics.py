"""`python evaluate.py task=metrics` end to end on tiny models made in the test: the tables,
plots and protocol record, one generation for the whole rerank sweep, best-of-k from the
pool, and resume after a kill giving identical results.

The Inception weights are a randomly initialised torch-fidelity InceptionV3 (no real weights
can be downloaded here): FID and IS are meaningless numbers in these tests; what is tested is
the protocol around them (tests/test_fidelity.py checks them against torch-fidelity itself).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch_fidelity

from dalle_lightning.checkpoints import export_dvae
from dalle_lightning.evaluate import evaluate
from dalle_lightning.evaluation import candidates
from dalle_lightning.evaluation.fidelity import load_images
from dalle_lightning.evaluation.random_inception import save_random_inception
from dalle_lightning.models.dalle import DALLE
from dalle_lightning.models.dvae import DVAE, DVAEConfig
from dalle_lightning.sampling.rerank import TrainedClip
from dalle_lightning.train import train
from tests.conftest import compose_config
from tests.test_clip import CLIP_RUN
from tests.test_dalle_train import DATA, NET
from tests.test_file_datasets import COCO_MINI, needs_coco


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A stage-2 checkpoint (random dVAE, 4 prior steps), a CLIP checkpoint (3 steps) and a
    random Inception weights file."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    dvae = root / "dvae.pt"
    torch.save(export_dvae(DVAE(DVAEConfig(image_size=32, n_hid=8, n_init=8, vocab_size=32))), dvae)
    steps = ["debug=limit", "trainer.max_steps=4", "trainer.val_check_interval=4"]
    cfg = compose_config("train", ["model=dalle", f"model.dvae_ckpt={dvae}", *steps, *DATA, *NET],
                         root / "dalle")  # fmt: skip
    dalle = train(cfg)[1]["checkpoints"]["last"]
    clip = train(compose_config("train", CLIP_RUN, root / "clip"))[1]["checkpoints"]["last"]
    return {"dalle": dalle, "clip": clip, "inception": save_random_inception(root / "inc.pth")}


def metrics_cfg(trained, log_dir: Path, *extra: str):
    return compose_config(
        "evaluate",
        [
            f"ckpt_path={trained['dalle']}",
            f"reranker.ckpt_path={trained['clip']}",
            f"inception_weights={trained['inception']}",
            "dataset.image_size=32",
            "num_captions=4",
            "rerank_counts=[1,2,4]",
            "blur_radii=[0,1]",
            "sampling.batch_size=4",  # 4 candidates: one caption per chunk
            *extra,
        ],
        log_dir,
    )


GENERATE = DALLE.generate  # the unpatched method


class Killed(Exception):
    """Stands for the process being killed mid-generation."""


def count_generated(monkeypatch, fail_on_call: int | None = None) -> list[int]:
    """Record the number of images of every DALLE.generate call; optionally die on one."""
    calls: list[int] = []
    real = GENERATE

    def counting(self, captions, num_images=1, **kw):
        if fail_on_call is not None and len(calls) + 1 == fail_on_call:
            raise Killed
        calls.append(len(captions) * num_images)
        return real(self, captions, num_images, **kw)

    monkeypatch.setattr(DALLE, "generate", counting)
    return calls


def test_metrics_sweep_writes_tables_and_costs_one_generation(trained, tmp_path, monkeypatch):
    calls = count_generated(monkeypatch)
    cfg = metrics_cfg(trained, tmp_path, "fidelity=false")  # FID/IS: the next test
    assert list(cfg.splits) == ["test", "heldout"]  # protocol/shapes.yaml
    summary = evaluate(cfg)

    # one pool of max(k) = 4 candidates per caption serves k = 1, 2, 4: 16 images per split
    assert calls == [4] * 8 and sum(calls) == 2 * 4 * 4
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert len(rows) == 2 * 3  # splits x k
    for name in ("results.csv", "results.md", "samples_test.png", "samples_heldout.png",
                 "metrics.json"):  # fmt: skip
        assert (tmp_path / name).is_file(), name
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    md = (tmp_path / "results.md").read_text()
    assert "### test" in md and "### heldout" in md and "attribute acc." in md

    protocol = results["protocol"]
    assert protocol["reranker"]["name"] == "trained" and protocol["seed"] == cfg.seed
    assert protocol["per_split"]["test"]["images_generated_this_run"] == 16

    # best-of-k really is the reranker's best among the first k candidates
    clip = TrainedClip(trained["clip"])
    pool = Path(protocol["per_split"]["test"]["pool"]) / "candidates"
    captions = json.loads((pool.parent / "captions.json").read_text())
    assert len(captions) == 4 and all(isinstance(c[1], str) for c in captions)
    for i, row in enumerate(candidates.candidate_paths(pool, 4, 4)):
        scores = clip.score(load_images(row), [captions[i][1]] * 4)
        best = row[int(scores.argmax())]
        assert (tmp_path / "test" / "best_of_4" / f"{i:06d}.png").read_bytes() == best.read_bytes()
        first = (tmp_path / "test" / "best_of_1" / f"{i:06d}.png").read_bytes()
        assert first == row[0].read_bytes()
    by_k = {(r["split"], r["k"]): r for r in rows}
    for split in ("test", "heldout"):
        scores = [by_k[(split, k)]["clip_score"] for k in (1, 2, 4)]
        assert scores == sorted(scores)  # nested best-of-k: never worse with more candidates
        assert by_k[(split, 1)]["attribute_accuracy"] is not None
    assert summary["metrics"]["test/clip_score_k4"] == by_k[("test", 4)]["clip_score"]


def test_fid_and_is_for_every_k_and_blur_radius(trained, tmp_path):
    cfg = metrics_cfg(trained, tmp_path, "splits=[test]", "rerank_counts=[1,2]", "blur_radii=[0,2]")
    evaluate(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["k"], r["blur_radius"]): r for r in results["rows"]}
    assert sorted(rows) == [(1, 0), (1, 2), (2, 0), (2, 2)]
    for name in ("fid_vs_rerank.png", "fid_vs_blur.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    assert "FID blur 2" in (tmp_path / "results.md").read_text()
    protocol = results["protocol"]
    assert protocol["inception_weights"]["file"] == str(trained["inception"])
    assert len(protocol["inception_weights"]["sha256"]) == 64
    assert protocol["fid_backend"].startswith("torch-fidelity")
    # blur on both sides: the (k=2, blur 2) number is torch-fidelity's on the two blurred sets
    pool = Path(protocol["per_split"]["test"]["pool"])
    direct = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "test" / "best_of_2_blur2"),
        input2=str(pool / "real_blur2"),
        fid=True,
        feature_extractor_weights_path=str(trained["inception"]),
        cuda=False,
        verbose=False,
    )
    assert rows[(2, 2)]["fid"] == pytest.approx(direct["frechet_inception_distance"], rel=1e-6)
    assert rows[(2, 2)]["fid"] != pytest.approx(rows[(2, 0)]["fid"], rel=1e-3)  # blur counts
    assert len(list((pool / "real_blur2").glob("*.png"))) == 4


def test_killed_evaluation_resumes_with_identical_results(trained, tmp_path, monkeypatch):
    one = ["splits=[test]", "fidelity=false"]  # FID of identical images is identical
    evaluate(metrics_cfg(trained, tmp_path / "whole", *one))

    count_generated(monkeypatch, fail_on_call=3)  # dies while making the 3rd caption's images
    with pytest.raises(Killed):
        evaluate(metrics_cfg(trained, tmp_path / "killed", *one))
    calls = count_generated(monkeypatch)
    again = evaluate(metrics_cfg(trained, tmp_path / "killed", *one))
    assert calls == [4, 4]  # only the two unfinished captions are generated again
    info = again["protocol"]["per_split"]["test"]
    assert info["images_generated_this_run"] == 8 and info["images_reused_this_run"] == 8

    whole = json.loads((tmp_path / "whole" / "results.json").read_text())["rows"]
    resumed = json.loads((tmp_path / "killed" / "results.json").read_text())["rows"]
    assert whole == resumed
    a = sorted((tmp_path / "whole" / "eval_pools").rglob("candidates/*.png"))
    b = sorted((tmp_path / "killed" / "eval_pools").rglob("candidates/*.png"))
    assert len(a) == len(b) == 16
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True))


def test_bad_protocol_values_fail_before_any_work(trained, tmp_path):
    from dalle_lightning.config import ConfigError

    for override, field in [
        ("rerank_counts=[0,2]", "rerank_counts"),
        ("blur_radii=[-1]", "blur_radii"),
        ("num_captions=1", "num_captions"),
        ("inception_weights=/no/such.pth", "inception_weights"),
        ("splits=[nope]", "splits"),
    ]:
        with pytest.raises(ConfigError, match=field):
            evaluate(metrics_cfg(trained, tmp_path, override))
    assert not (tmp_path / "eval_pools").exists()


@needs_coco
def test_metrics_on_the_real_coco_layout(trained, tmp_path):
    """`evaluate.py dataset=coco dataset.root=.../coco_mini num_captions=...`: the val2017
    captions file names 5,000 images, 159 are on disk; captions come from those 159."""
    cfg = metrics_cfg(
        trained,
        tmp_path,
        "dataset=coco",
        f"dataset.root={COCO_MINI}",
        "dataset.max_bad_fraction=1",  # 4,841 of the 5,000 listed val images are not here
        "dataset.num_workers=0",
        "num_captions=5",
        "rerank_counts=[1,2]",
        "blur_radii=[0]",
    )
    assert list(cfg.splits) == ["val"]
    evaluate(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    info = results["protocol"]["per_split"]["val"]
    assert info["captions"] == 5 and 1 <= info["real_images"] <= 5
    assert [(r["k"], r["blur_radius"]) for r in results["rows"]] == [(1, 0), (2, 0)]
    on_disk = {p.stem for p in (COCO_MINI / "val2017").glob("*.jpg")}
    captions = json.loads((Path(info["pool"]) / "captions.json").read_text())
    assert len({c for _, c in captions}) == 5
    real = list((Path(info["pool"]) / "real").glob("*.png"))
    assert len(real) == info["real_images"] and len(on_disk) == 159
