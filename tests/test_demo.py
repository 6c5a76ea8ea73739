"""The demo page (`python demo.py`): request checks, the caption parser, and the page itself in
headless Chromium (Debian's package, driven by Playwright) against a prior and a CLIP trained
here for a few steps (their images mean nothing; the tests check the plumbing: ranking,
downloads equal to evaluate.py task=generate, bad input, a bounded queue)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_lightning.checkpoints import export_dvae
from dalle_lightning.data.shapes import ShapesConfig, ShapesDataset, parse_caption
from dalle_lightning.demo.request import DemoInputError, DemoLimits, check_request
from dalle_lightning.evaluate import evaluate
from dalle_lightning.models.dvae import DVAE, DVAEConfig
from dalle_lightning.sampling.sampler import SamplingConfig
from dalle_lightning.train import train
from tests.conftest import ROOT, compose_config, run_script
from tests.test_clip import CLIP_RUN
from tests.test_dalle_train import DATA, NET

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
GOOD = dict(candidates=4, temperature=1.0, top_k=0, top_p=1.0, cond_scale=1.0, seed=0)


def test_parse_caption_inverts_the_renderer():
    for split in ("train", "heldout"):
        dataset = ShapesDataset(ShapesConfig(), split, 200)
        for i in range(200):
            item = dataset[i]
            want = [
                {k: obj[k] for k in ("colour", "shape", "size", "position")}
                for obj in item["record"]["objects"]
            ]
            parsed = parse_caption(item["caption"])
            assert parsed == {"objects": want, "relation": item["record"]["relation"]}, item
    assert parse_caption("  A Small red circle on the left. ")["objects"][0]["size"] == "small"
    for other in ("a cat on a mat", "a red circle above a red square", "", "a pink circle"):
        assert parse_caption(other) is None, other


def check(**values):
    args = {**GOOD, **values}
    caption = args.pop("caption", "a red circle")
    return check_request(
        caption, *args.values(), DemoLimits(), SamplingConfig(jacobi_window=3), False
    )


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(caption=""), "Caption: it is empty"),
        (dict(caption="   "), "Caption: it is empty"),
        (dict(caption="x" * 10_000), "Caption: 10,000 characters is too long; use at most 1,000"),
        (dict(candidates=0), "Candidates: 0 is out of range; use a whole number from 1 to 64"),
        (dict(candidates=1000), "Candidates: 1000 is out of range"),
        (dict(candidates=2.5), "Candidates: 2.5 is out of range"),
        (dict(candidates=None), "Candidates: no value given"),
        (dict(temperature=0), "Temperature: 0 must be above 0"),
        (dict(temperature="hot"), "Temperature: 'hot' is not a number"),
        (dict(top_p=0), "Top-p: 0 must be in (0, 1]"),
        (dict(top_k=-1), "Top-k: -1 is out of range"),
        (dict(seed=float("nan")), "Seed: nan is not a finite number"),
        (dict(cond_scale=-1), "Guidance scale: -1.0 cannot be used"),
        (dict(cond_scale=3), "Guidance scale: 3.0 cannot be used; 1 for this checkpoint"),
    ],
)
def test_bad_requests_get_a_message_naming_the_field(values, message):
    with pytest.raises(DemoInputError) as err:
        check(**values)
    assert str(err.value).startswith(message), str(err.value)


def test_good_request_maps_off_values_and_keeps_the_checkpoint_window():
    request = check(caption="猫と🐱 a red circle", candidates=3.0, top_k=0, top_p=1, seed=7)
    assert request.caption == "猫と🐱 a red circle" and request.candidates == 3
    assert request.sampling == SamplingConfig(1.0, None, 1.0, 1.0, jacobi_window=3)
    assert check(top_k=5).sampling.top_k == 5


# the page in a real browser ---------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A prior (on a random dVAE) and a CLIP, each trained a few steps on 32 px shapes."""
    root = tmp_path_factory.mktemp("demo_models")
    torch.manual_seed(0)
    dvae = root / "dvae.pt"
    torch.save(export_dvae(DVAE(DVAEConfig(image_size=32, n_hid=8, n_init=8, vocab_size=32))), dvae)
    prior_cfg = compose_config(
        "train",
        ["model=dalle", "debug=limit", "trainer.max_steps=4", f"model.dvae_ckpt={dvae}"]
        + DATA
        + NET,
        root / "prior",
    )
    _, prior = train(prior_cfg)
    _, clip = train(compose_config("train", CLIP_RUN, root / "clip"))
    return {"prior": prior["checkpoints"]["last"], "clip": clip["checkpoints"]["last"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    pytest.importorskip("gradio", reason='the demo extra: pip install -e ".[demo]"')
    logs = tmp_path_factory.mktemp("demo_logs")
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "demo.py"),
            f"ckpt_path={trained['prior']}",
            f"reranker.ckpt_path={trained['clip']}",
            f"server.port={port}",
            "server.max_concurrency=2",
            "sampling.batch_size=8",
            f"paths.log_dir={logs}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail("the demo did not start:\n" + process.stdout.read())
            time.sleep(0.5)
    yield {"url": url, "logs": logs, **trained}
    process.terminate()
    process.wait(timeout=30)


def grid_tile(png: Path, index: int, n: int, size: int = 32) -> np.ndarray:
    """Tile `index` of evaluate.py's make_grid (nrow = min(n, 8), padding 2)."""
    grid = np.asarray(Image.open(png).convert("RGB"))
    row, col = divmod(index, min(n, 8))
    y, x = 2 + row * (size + 2), 2 + col * (size + 2)
    return grid[y : y + size, x : x + size]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run does)")
def test_page_generates_ranks_and_downloads_what_evaluate_draws(server, make_cfg, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    caption, n, seed = "a small red circle on the left", 6, 11
    outside = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        page = browser.new_page()
        page.on("request", lambda r: None if r.url.startswith((server["url"], "data:", "blob:"))
                else outside.append(r.url))  # fmt: skip
        page.goto(server["url"])
        page.locator("#caption textarea").fill(caption)
        page.locator("#candidates input").fill(str(n))
        page.locator("#temp input").fill("1")
        page.locator("#top_k input").fill("0")
        page.locator("#top_p input").fill("1")
        page.locator("#cond_scale input").fill("1")
        page.locator("#seed input").fill(str(seed))
        page.locator("#generate").click()
        page.wait_for_selector("#ranking tr[data-rank]", timeout=120_000)
        rows = page.locator("#ranking tr[data-rank]")
        assert rows.count() == n
        assert page.locator("#gallery img").count() == n
        scores = [float(rows.nth(i).get_attribute("data-score")) for i in range(n)]
        assert scores == sorted(scores, reverse=True)
        best_index = int(rows.nth(0).get_attribute("data-index"))
        with page.expect_download() as download:
            page.locator("#downloads a").first.click()
        png = tmp_path / "best.png"
        download.value.save_as(png)
        browser.close()
    assert outside == []  # offline: nothing but the demo's own server

    meta = Image.open(png).text
    assert meta["caption"] == caption and json.loads(meta["seed"]) == seed
    assert json.loads(meta["rank"]) == 1 and json.loads(meta["index"]) == best_index
    assert json.loads(meta["score"]) == scores[0]
    # the same caption, seed and settings through evaluate.py: the same pixels
    cfg = make_cfg(json.loads(meta["evaluate_overrides"]), config_name="evaluate")
    result = evaluate(cfg)
    grid = Path(result["generated"][0]["png"])
    downloaded = np.asarray(Image.open(png).convert("RGB"))
    assert np.array_equal(downloaded, grid_tile(grid, best_index, n))
    # and the demo's run directory has the request and a metrics.json counting it
    metrics = json.loads(next(server["logs"].glob("demo/runs/*/metrics.json")).read_text())
    assert metrics["metrics"]["requests_served"] >= 1


def test_bad_inputs_and_twenty_users_at_once_all_get_answers(server):
    pytest.importorskip("gradio_client")
    from gradio_client import Client

    client = Client(server["url"], verbose=False)
    bad = [
        dict(caption=""),
        dict(caption="x" * 10_000),
        dict(candidates=0),
        dict(candidates=1000),
        dict(temperature=0),
    ]
    for values in bad:
        args = {"caption": "a red circle", **GOOD, **values}
        gallery, table, files, status = client.predict(*args.values(), api_name="/generate")
        assert status.startswith("**Not generated.**") and gallery == [] and not files, values
    # non-Latin text and emoji are a caption like any other
    gallery, _, _, status = client.predict(
        "猫 🐱 кошка", *list(GOOD.values()), api_name="/generate"
    )
    assert len(gallery) == GOOD["candidates"], status

    def one(i: int) -> int:
        user = Client(server["url"], verbose=False)
        args = {"caption": f"a blue square {i}", **GOOD, "candidates": 2, "seed": i}
        gallery, *_ = user.predict(*args.values(), api_name="/generate")
        return len(gallery)

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(one, range(20)))
    assert answers == [2] * 20
    # still serving
    gallery, *_ = client.predict("a green triangle", *GOOD.values(), api_name="/generate")
    assert len(gallery) == GOOD["candidates"]


@pytest.mark.parametrize(
    "override, field",
    [
        ("server.port=-1", "server.port"),
        ("server.port=70000", "server.port"),
        ("server.max_concurrency=0", "server.max_concurrency"),
        ("server.share=maybe", "server.share"),
        ("limits.max_candidates=0", "limits.max_candidates"),
        ("attribute_check=1", "attribute_check"),
        ("sampling.temperature=0", "sampling.temperature"),
    ],
)
def test_bad_demo_config_fails_before_any_work(make_cfg, tmp_path, override, field):
    from dalle_lightning.config import ConfigError
    from dalle_lightning.demo.page import serve

    cfg = make_cfg([override], config_name="demo")
    with pytest.raises(ConfigError) as err:
        serve(cfg, block=False)
    assert err.value.field == field
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("metrics.json"))


def test_demo_without_a_prior_says_how_to_get_one(tmp_path):
    result = run_script("demo.py", f"paths.log_dir={tmp_path}", timeout=120)
    assert result.returncode == 2
    assert "ckpt_path=None is invalid: a stage-2 checkpoint" in result.stderr
    assert "python train.py model=dalle" in result.stderr
    assert f"none found under {tmp_path / 'train_dalle'}:" in result.stderr  # where it looked
