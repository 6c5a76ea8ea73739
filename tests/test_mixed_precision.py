"""Under 16-mixed the paper's fp32 islands hold: dtypes inspected inside the autocast region.

CPU autocast with float16 stands in for a GPU's 16-mixed (the same per-op casting rules)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from dalle_lightning.callbacks.nonfinite import NonFiniteGuard
from dalle_lightning.models.dvae import DVAE, DVAEConfig
from dalle_lightning.models.transformer import PriorConfig, PriorTransformer
from dalle_lightning.modules.losses import prior_loss
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


class _Prior(pl.LightningModule):
    """The prior's loss on fixed random tokens; the loss is scaled past fp16's range at
    `overflow_step`, and the logits' dtype is recorded at every step."""

    def __init__(self, overflow_step: int):
        super().__init__()
        torch.manual_seed(0)
        self.config = PriorConfig(
            text_vocab=40, text_seq_len=6, image_vocab=24, grid_size=4, dim=32, depth=2, heads=4
        )
        self.prior = PriorTransformer(self.config)
        self.overflow_step = overflow_step
        self.weights_before: dict[int, torch.Tensor] = {}
        self.logit_dtypes: set[torch.dtype] = set()
        self.block_dtypes = _record_dtypes({"qkv": self.prior.blocks[0].attention.qkv})

    def training_step(self, batch, batch_idx):
        text, codes = batch
        self.weights_before[self.global_step] = self.prior.to_image_logits.weight.detach().clone()
        out = self.prior(text, codes)
        self.logit_dtypes |= {out.text_logits.dtype, out.image_logits.dtype}
        loss = prior_loss(*out, text, codes, 0.125)[0]
        return loss * 1e30 if self.global_step == self.overflow_step else loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_16_mixed_composes_with_its_grad_scaler_and_the_nonfinite_guard(tmp_path):
    """Lightning's 16-mixed plugin (fp16 autocast + GradScaler; CPU autocast stands in for a
    GPU's, so the plugin is handed over directly: check_trainer refuses 16-mixed on CPU for
    real runs). A step whose fp16 gradients overflow is skipped once, by the scaler (its scale
    halves) and by the guard (counted, weights untouched); the steps around it train; the
    blocks run in fp16 and the logits stay fp32 inside the run."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randint(0, 40, (32, 6), generator=g), torch.randint(0, 24, (32, 16), generator=g)
    )
    module = _Prior(overflow_step=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    guard = NonFiniteGuard(max_in_row=3)
    trainer = pl.Trainer(
        max_steps=5,
        accelerator="cpu",
        plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert trainer.precision == "16-mixed"
    assert guard.skipped == 1 and guard.in_row == 0
    assert scaler.get_scale() == 2.0**9  # halved once, at the overflow
    w = module.weights_before
    assert torch.equal(w[2], w[3])  # the overflowing step changed nothing
    assert not torch.equal(w[1], w[2]) and not torch.equal(w[3], w[4])
    assert module.block_dtypes["qkv"] == torch.float16
    assert module.logit_dtypes == {torch.float32}


def test_the_fp32_island_compiles_into_one_graph_where_dynamo_cannot_trace_the_autocast_query(
    monkeypatch,
):
    """Dynamo in torch 2.11 cannot trace `torch.amp.is_autocast_available` (it broke the
    compiled static decoding step on a GPU); a stand-in that breaks the graph the same way must
    not be reached under compilation, and the island still runs in fp32."""
    from dalle_lightning.models.fp32 import in_fp32

    real = torch.amp.is_autocast_available

    def untraceable(device: str) -> bool:
        torch._dynamo.graph_break()
        return real(device)

    monkeypatch.setattr(torch.amp, "is_autocast_available", untraceable)
    torch._dynamo.reset()
    layer = torch.nn.Linear(4, 3)
    island = torch.compile(lambda x: in_fp32(layer, x.exp()), fullgraph=True)
    x = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = island(x)
    assert out.dtype == torch.float32  # inside autocast, the island's output stays fp32
    torch.testing.assert_close(island(x), layer(x.exp()))
