"""Under 16-mixed the paper's fp32 islands hold: dtypes inspected inside the autocast region.

CPU autocast with float16 stands in for a GPU's 16-mixed (the same per-op casting rules)."""

from __future__ import annotations

import torch

from dalle_lightning.models.dvae import DVAE, DVAEConfig
from dalle_lightning.models.transformer import PriorConfig, PriorTransformer
from dalle_lightning.sampling.kv_decoder import KVDecoder


def _record_dtypes(modules: dict) -> dict:
    """name -> dtype of that module's output, filled in by forward hooks as the model runs."""
    seen = {}
    for name, module in modules.items():
        hook = (lambda n: lambda _m, _i, out: seen.__setitem__(n, out.dtype))(name)
        module.register_forward_hook(hook)
    return seen


def test_dvae_code_logits_and_decoder_input_run_in_fp32_under_autocast():
    torch.manual_seed(0)
    dvae = DVAE(DVAEConfig(image_size=32, n_hid=8, n_init=8, vocab_size=32))
    seen = _record_dtypes(
        {
            "encoder logits conv": dvae.encoder.blocks.output.conv,
            "encoder first conv": dvae.encoder.blocks.input,
            "decoder first conv": dvae.decoder.blocks.input,
            "decoder output conv": dvae.decoder.blocks.output.conv,
        }
    )
    with torch.autocast("cpu", dtype=torch.float16):
        out = dvae(torch.rand(2, 3, 32, 32), tau=1.0)
    assert seen == {
        "encoder first conv": torch.float16,  # autocast is on for the rest
        "encoder logits conv": torch.float32,
        "decoder first conv": torch.float32,
        "decoder output conv": torch.float16,
    }
    assert out.logits.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in dvae.parameters())


def test_prior_logits_are_fp32_under_autocast_in_training_and_cached_sampling():
    torch.manual_seed(0)
    config = PriorConfig(
        text_vocab=40, text_seq_len=6, image_vocab=24, grid_size=4, dim=32, depth=2, heads=4
    )
    prior = PriorTransformer(config).eval()
    seen = _record_dtypes({"qkv": prior.blocks[0].attention.qkv})
    text = torch.randint(0, 40, (2, 6))
    codes = torch.randint(0, 24, (2, 16))
    with torch.autocast("cpu", dtype=torch.float16):
        out = prior(text, codes)
        with torch.no_grad():
            decoder = KVDecoder(prior, batch=2)
            first = decoder.prefill(text)
            second = decoder.step(first.argmax(-1))
    assert seen["qkv"] == torch.float16  # the blocks run in half precision
    assert out.text_logits.dtype == out.image_logits.dtype == torch.float32
    assert first.dtype == second.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in prior.parameters())  # embeddings, gains, biases
