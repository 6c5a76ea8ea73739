"""The static-shape decoding step (the GPU path for CUDA graphs) against the KV decoder."""

from __future__ import annotations

import pytest
import torch

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
