"""The static-shape decoding step (the GPU path for CUDA graphs) against the KV decoder."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from dalle_lightning.sampling.kv_decoder import KVDecoder
from dalle_lightning.sampling.sampler import SamplingConfig, sample_codes
from dalle_lightning.sampling.static_decoder import StaticDecoder
from tests.test_transformer import GRID, T, inputs, tiny


@pytest.mark.parametrize("attention", ["full", "sparse"])
def test_static_steps_equal_the_kv_decoder_within_1e_5(attention):
    """Every slot's logits, two batches through one StaticDecoder (its cache is reused)."""
    model = tiny(attention)
    static = StaticDecoder(model, batch=2)
    for seed in (1, 2):
        text, codes = inputs(batch=2, seed=seed)
        with torch.no_grad():
            decoder = KVDecoder(model, batch=2)
            expected = [decoder.prefill(text)]
            expected += [decoder.step(codes[:, p - 1]) for p in range(1, GRID * GRID)]
            got = [static.prefill(text)]
            got += [static.step(codes[:, p - 1], torch.tensor(T + p)) for p in range(1, GRID**2)]
        torch.testing.assert_close(torch.stack(got, 1), torch.stack(expected, 1), atol=1e-5, rtol=0)


def test_the_static_step_compiles_into_one_graph_for_every_slot_and_batch():
    """torch.compile(fullgraph=True) traces the step once: no graph break, no recompile as the
    slot moves or a new batch comes (what CUDA graphs need), and sampling with it gives the
    same codes as the KV decoder. A counting backend stands in for Inductor (no C++ build)."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    model = tiny("sparse")
    static = StaticDecoder(model, batch=2)
    static.step_fn = torch.compile(static.step, backend=counting_backend, fullgraph=True)
    sampling = SamplingConfig(temperature=0.8, top_k=10)
    for seed in (3, 4):
        text, _ = inputs(batch=2, seed=seed)
        compiled = sample_codes(
            model,
            text,
            sampling,
            torch.Generator().manual_seed(seed),
            keep_logits=True,
            static=static,
        )
        eager = sample_codes(
            model, text, sampling, torch.Generator().manual_seed(seed), keep_logits=True
        )
        assert torch.equal(compiled.codes, eager.codes)
        torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-5, rtol=0)
    assert len(graphs) == 1


NO_COMPILER = shutil.which("g++") is None


@pytest.mark.skipif(NO_COMPILER, reason="Inductor's CPU backend needs a C++ compiler (g++)")
def test_inductor_writes_one_slot_per_step_not_the_whole_cache():
    """Inductor itself (C++ kernels on CPU): the compiled step equals the eager one, and no
    generated loop runs over a layer's whole cache. The cache's tensors are updated in place;
    when they were views of one buffer for all layers, Inductor copied the whole cache in
    every layer of every step (~3x slower than the eager step on CPU: docs/speed.md). The loop
    bounds are read from the generated source; the test fails if none are found."""
    model = tiny("sparse", depth=2)
    text, codes = inputs(batch=2, seed=5)
    static = StaticDecoder(model, batch=2)
    compiled = torch.compile(static.step, fullgraph=True)
    with torch.no_grad():
        static.prefill(text)
        expected = static.step(codes[:, 0], torch.tensor(T + 1))
        got, sources = run_and_get_code(compiled, codes[:, 0], torch.tensor(T + 1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    bounds = [int(n) for n in re.findall(r"x\d+<static_cast<int64_t>\((\d+)L\)", "".join(sources))]
    c = model.config
    one_layer = 2 * c.heads * c.seq_len * (c.dim // c.heads)  # a layer's keys: B * H * S * E
    assert bounds, "no loop bounds found in Inductor's code: update the pattern"
    assert max(bounds) < one_layer, f"a loop over {max(bounds)} elements (cache: {one_layer})"
