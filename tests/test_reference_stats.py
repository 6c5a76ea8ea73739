"""FID reference statistics (`python -m dalle_lightning.evaluation.reference_stats`) and
`evaluate.py fid_reference=...` on the real COCO files of shared/assets/coco_mini (where that
folder is beside the checkout), and on the built-in shapes (everywhere).

The Inception weights are randomly initialised torch-fidelity InceptionV3s made here (no real
weights can be downloaded): the FID values mean nothing; what is tested is that the reference
path gives the same numbers as the real images, and that a protocol mismatch is refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from dalle_lightning.checkpoints import file_sha256
from dalle_lightning.config import ConfigError
from dalle_lightning.evaluate import evaluate
from dalle_lightning.evaluation.random_inception import save_random_inception
from tests.conftest import run_command
from tests.test_file_datasets import COCO_MINI, needs_coco
from tests.test_rerank_metrics import metrics_cfg, trained  # noqa: F401 (a fixture)

COCO = [
    "dataset=coco",
    "dataset.max_bad_fraction=1",  # 4,841 of the 5,000 listed val images are not here
    "dataset.num_workers=0",
    "dataset.image_size=32",
    "num_captions=5",
    "rerank_counts=[1]",  # each FID costs an eigendecomposition of 2048 x 2048: few of them
    "blur_radii=[0,2]",
]


def test_the_round_trip_on_the_built_in_shapes(trained, tmp_path):  # noqa: F811
    """Needs no asset, so it runs on every machine: reference, FID equal from both sides,
    a mismatch refused."""
    shapes = ["splits=[test]", "rerank_counts=[1]", "blur_radii=[0,2]"]
    made = evaluate(metrics_cfg(trained, tmp_path / "made", "task=reference_stats", *shapes))
    folder = Path(made["reference"]["folder"])
    assert made["metrics"] == {"test/blur0/images": 4, "test/blur2/images": 4}
    evaluate(metrics_cfg(trained, tmp_path / "real", *shapes))
    evaluate(metrics_cfg(trained, tmp_path / "ref", *shapes, f"fid_reference={folder}"))
    _assert_same_rows(tmp_path / "real", tmp_path / "ref", ("fid", "is_mean", "attribute_accuracy"))
    with pytest.raises(ConfigError, match="caption_seed=1234"):
        evaluate(metrics_cfg(trained, tmp_path / "bad", *shapes, f"fid_reference={folder}",
                             "seed=7"))  # fmt: skip


@pytest.fixture(scope="module")
def reference(trained, tmp_path_factory) -> Path:  # noqa: F811
    """The reference folder, made by the command a user runs."""
    log_dir = tmp_path_factory.mktemp("reference")
    command = [sys.executable, "-m", "dalle_lightning.evaluation.reference_stats", *COCO]
    command += ["split=val"]  # = splits=[val], COCO's default
    command += [f"dataset.root={COCO_MINI}", f"inception_weights={trained['inception']}"]
    run = run_command([*command, f"paths.log_dir={log_dir}"], timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (folder,) = log_dir.glob("evaluate_reference_stats/runs/*/reference")
    return folder


@needs_coco
def test_the_reference_holds_statistics_protocol_and_captions(reference, trained):  # noqa: F811
    assert sorted(p.name for p in (reference / "val").iterdir()) == [
        "blur0.json",
        "blur0.npz",
        "blur2.json",
        "blur2.npz",
    ]  # the temporary real PNGs are gone
    meta = json.loads((reference / "val" / "blur2.json").read_text())
    protocol = meta["protocol"]
    assert protocol["dataset"] == {
        "dataset": "coco",
        "year": 2017,
        "image_size": 32,
        "max_image_pixels": 50_000_000,
    }  # no root folder: the reference is usable on another machine
    assert protocol["split"] == "val" and protocol["caption_seed"] == 1234
    assert protocol["num_captions"] == 5 and protocol["blur_radius"] == 2
    assert protocol["inception_weights_sha256"] == file_sha256(trained["inception"])
    assert protocol["file_format"].startswith("PNG, 8-bit")
    assert len(meta["captions"]) == 5 and meta["count"] == meta["real_images"] <= 5
    with np.load(reference / "val" / "blur2.npz") as data:
        assert data["mu"].shape == (2048,) and data["sigma"].shape == (2048, 2048)
        assert int(data["count"]) == meta["count"]
    assert meta["statistics_sha256"] == file_sha256(reference / "val" / "blur2.npz")


@needs_coco
def test_fid_from_the_reference_equals_fid_from_the_real_images(
    reference,
    trained,  # noqa: F811
    tmp_path,
):
    """The same prior, captions and candidates: FID and IS per (k, blur) agree to 1e-6
    relative. The reference run points `dataset.root` at an empty folder: no image is read."""
    real = evaluate(metrics_cfg(trained, tmp_path / "real", *COCO, f"dataset.root={COCO_MINI}"))
    empty = tmp_path / "no_images_here"
    empty.mkdir()
    ref = evaluate(
        metrics_cfg(
            trained, tmp_path / "ref", *COCO, f"dataset.root={empty}", f"fid_reference={reference}"
        )
    )
    rows = _assert_same_rows(tmp_path / "real", tmp_path / "ref", ("fid", "is_mean", "clip_score"))
    assert rows[(1, 0)]["fid"] != pytest.approx(rows[(1, 2)]["fid"], rel=1e-3)  # blur counts

    pools = [Path(run["protocol"]["per_split"]["val"]["pool"]) for run in (real, ref)]
    captions = [json.loads((pool / "captions.json").read_text()) for pool in pools]
    assert captions[0] == captions[1]  # the reference's captions: the ones the real run drew
    assert not (pools[1] / "real").exists()  # no real image written by the reference run

    recorded = json.loads((tmp_path / "ref" / "results.json").read_text())["protocol"]
    entry = recorded["fid_reference"]["val/blur2"]
    assert entry["path"] == str(reference / "val" / "blur2.npz")
    assert entry["sha256"] == file_sha256(reference / "val" / "blur2.npz")
    assert entry["protocol"]["blur_radius"] == 2
    assert (
        json.loads((tmp_path / "real" / "results.json").read_text())["protocol"]["fid_reference"]
        is None
    )


def _rows(out_dir: Path) -> dict[tuple, dict]:
    rows = json.loads((out_dir / "results.json").read_text())["rows"]
    return {(r["k"], r["blur_radius"]): r for r in rows}


def _assert_same_rows(real: Path, ref: Path, metrics: tuple[str, ...]) -> dict[tuple, dict]:
    """The rows (k, blur) of the run against the real images equal those of the run against
    the reference, metric by metric, to 1e-6 relative; the former returned."""
    rows, ref_rows = _rows(real), _rows(ref)
    assert sorted(rows) == sorted(ref_rows) == [(1, 0), (1, 2)]
    for key, row in rows.items():
        for metric in metrics:
            assert ref_rows[key][metric] == pytest.approx(row[metric], rel=1e-6), (key, metric)
    return rows


@needs_coco
@pytest.mark.parametrize(
    "override, field",
    [
        ("seed=7", "caption_seed=1234"),
        ("num_captions=4", "num_captions=5"),
        ("dataset.year=2014", "dataset="),
        ("other_weights", "inception_weights_sha256="),
    ],
)
def test_a_reference_with_another_protocol_is_refused_before_any_work(
    reference,
    trained,  # noqa: F811
    tmp_path,
    override,
    field,
):
    if override == "other_weights":
        override = f"inception_weights={save_random_inception(tmp_path / 'other.pth', seed=1)}"
    cfg = metrics_cfg(
        trained, tmp_path, *COCO, f"dataset.root={COCO_MINI}", f"fid_reference={reference}",
        override,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="fid_reference") as err:
        evaluate(cfg)
    assert field in str(err.value) and "reference_stats" in str(err.value)
    assert not (tmp_path / "eval_pools").exists()


@needs_coco
def test_a_missing_radius_or_a_changed_file_is_refused(reference, trained, tmp_path):  # noqa: F811
    common = [*COCO, f"dataset.root={COCO_MINI}", f"fid_reference={reference}"]
    with pytest.raises(ConfigError, match="blur radius 1"):
        evaluate(metrics_cfg(trained, tmp_path, *common, "blur_radii=[0,1]"))
    copy = tmp_path / "copy"
    for path in reference.rglob("*"):
        if path.is_file():
            target = copy / path.relative_to(reference)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    with np.load(copy / "val" / "blur0.npz") as data:
        np.savez(copy / "val" / "blur0.npz", mu=data["mu"] + 1, sigma=data["sigma"], count=5)
    with pytest.raises(ConfigError, match="sha256 differs"):
        evaluate(metrics_cfg(trained, tmp_path, *COCO, f"dataset.root={COCO_MINI}",
                             f"fid_reference={copy}"))  # fmt: skip


@needs_coco
def test_the_command_line_refusal_is_one_line(reference, trained, tmp_path):  # noqa: F811
    command = [sys.executable, "evaluate.py", *COCO, f"dataset.root={COCO_MINI}"]
    command += [f"ckpt_path={trained['dalle']}", f"reranker.ckpt_path={trained['clip']}"]
    command += [f"inception_weights={trained['inception']}", f"fid_reference={reference}"]
    command += ["seed=7", f"paths.log_dir={tmp_path}"]
    run = run_command(command, timeout=600)
    assert run.returncode == 2, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "caption_seed=1234" in errors[0], run.stderr[-2000:]
