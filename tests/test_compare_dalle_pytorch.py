"""python -m dalle_lightning.compare_dalle_pytorch: dalle-pytorch is optional, its unused imports
are stubbed, and its cache is made to work. A stand-in `dalle_pytorch` package (written here,
with the imports and the cache-dropping method of 1.6.6) replaces the real one."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from dalle_lightning import compare_dalle_pytorch as compare

FAKE = """
import pkg_resources, requests
from taming.models.vqgan import VQModel, GumbelVQ

class DALLE:
    def __call__(self, text, cache=None):
        return cache

    def forward_with_cond_scale(self, *args, cond_scale=1, cache=None, **kwargs):
        if cond_scale == 1:
            return self(*args, **kwargs)  # what 1.6.6 does: the cache is dropped
"""


@pytest.fixture
def fake_dalle_pytorch(tmp_path, monkeypatch):
    package = tmp_path / "dalle_pytorch"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "dalle_pytorch.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    real = importlib.util.find_spec

    def find_spec(name, *args):  # as on a machine without these three packages
        return None if name in ("pkg_resources", "requests", "taming") else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    for name in list(sys.modules):
        if name.split(".")[0] in ("dalle_pytorch", "pkg_resources", "requests", "taming"):
            monkeypatch.delitem(sys.modules, name)
    yield
    for name in list(sys.modules):  # the stand-ins go; monkeypatch then restores the real ones
        if name.split(".")[0] in ("dalle_pytorch", "pkg_resources", "requests", "taming"):
            sys.modules.pop(name)


def test_missing_imports_are_stubbed_and_the_cache_is_passed_on(fake_dalle_pytorch):
    dp = compare.import_dalle_pytorch()
    cache: dict = {}
    assert dp.DALLE().forward_with_cond_scale("text", cond_scale=1, cache=cache) is cache
    with pytest.raises(NotImplementedError, match="unguided"):
        dp.DALLE().forward_with_cond_scale("text", cond_scale=3, cache=cache)


def test_without_dalle_pytorch_it_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "dalle_pytorch" else real(n, *a)
    )
    with pytest.raises(SystemExit, match="pip install --no-deps dalle-pytorch==1.6.6"):
        compare.import_dalle_pytorch()


def test_help_lists_its_own_flags_and_the_benchmarks(capsys):
    with pytest.raises(SystemExit):
        compare.main(["--help"])
    shown = capsys.readouterr().out
    assert "dalle-pytorch 1.6.6" in shown and "--per-round" in shown and "--grid" in shown
    assert "four hot paths" not in shown  # not the benchmark's own description


def test_only_the_comparable_settings_are_accepted():
    for flags in (["--ckpt", "last.ckpt"], ["--decoder", "static"]):
        with pytest.raises(SystemExit, match="random weights and the KV decoder"):
            compare.main(flags)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--warmup", "1"], "use those instead of --warmup and --repeats"),
        (["--repeats", "9"], "use those instead of --warmup and --repeats"),
        (["--only", "generate,dvae_train"], "times generate and prior_train, not dvae_train"),
    ],
)
def test_flags_it_would_ignore_are_refused(flags, message):
    with pytest.raises(SystemExit, match=message):
        compare.main(flags)


@pytest.mark.parametrize("only", ["generate", "prior_train"])
def test_only_times_the_part_asked_for(only, fake_dalle_pytorch, monkeypatch, capsys):
    """--only was ignored once (both parts ran, twice the time): now each part runs alone."""
    dp = compare.import_dalle_pytorch()
    calls: list[str] = []

    class Theirs:  # dalle-pytorch's DALLE as the comparison uses it, counting its calls
        image_seq_len = 4

        def __init__(self, **kwargs):
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def named_parameters(self):
            return [("transformer.weight", self.weight)]

        def parameters(self):
            return [self.weight]

        def __call__(self, text, codes, return_loss):
            calls.append("prior_train")
            return (self.weight * 0).sum()

        def generate_images(self, text, filter_thres, use_cache):
            calls.append("generate")

        def eval(self):
            return self

        def train(self):
            return self

    monkeypatch.setattr(dp, "DALLE", Theirs)
    monkeypatch.setattr(dp, "DiscreteVAE", lambda **kwargs: None, raising=False)
    sizes = ["--dim", "16", "--depth", "1", "--heads", "2", "--text-seq-len", "4"]
    sizes += ["--image-size", "8", "--grid", "2", "--text-vocab", "16", "--image-vocab", "8"]
    compare.main([*sizes, "--rounds", "1", "--per-round", "1", "--only", only])
    shown = json.loads(capsys.readouterr().out)
    assert set(shown) == {only, "config"} and len(shown[only]) == 1
    assert set(calls) == {only}
