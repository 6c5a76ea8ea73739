"""The planner (`python -m dalle_lightning.plan`): the parameter count is the model's own, the
paper's prior comes out at its 12B, and the activation estimate matches what autograd keeps in
small CPU runs."""

from __future__ import annotations

import json

import pytest
import torch

from dalle_lightning.models.transformer import PriorConfig, PriorTransformer
from dalle_lightning.modules.losses import prior_loss
from dalle_lightning.plan import GPUS, Setup, activation_bytes, main, plan, prior_parameters

SMALL = PriorConfig(
    text_vocab=512, text_seq_len=32, image_vocab=512, grid_size=16, dim=256, depth=4, heads=8
)


def test_parameter_count_is_the_built_models_exactly():
    torch.manual_seed(0)
    built = PriorTransformer(SMALL)
    counts = prior_parameters(SMALL)  # on the meta device
    assert counts["total"] == sum(p.numel() for p in built.parameters())
    assert counts["blocks"] == sum(p.numel() for p in built.blocks.parameters())
    D, V = SMALL.dim, SMALL.text_vocab + SMALL.text_seq_len
    assert counts["block"] == 12 * D * D + 13 * D  # qkv, proj, MLP weights and biases, 2 norms
    assert counts["heads"] == D * V + V + D * SMALL.image_vocab + SMALL.image_vocab
    # one AdamW step on the built model: its state and gradients are what the plan counts
    optimizer = torch.optim.AdamW(built.parameters())
    text = torch.randint(0, SMALL.text_vocab, (1, SMALL.text_seq_len))
    codes = torch.randint(0, SMALL.image_vocab, (1, SMALL.image_seq_len))
    prior_loss(*built(text, codes), text, codes, 0.125)[0].backward()
    optimizer.step()
    moments = sum(
        t.nbytes for state in optimizer.state.values() for t in state.values() if t.dim() > 0
    )
    gradients = sum(p.grad.nbytes for p in built.parameters())
    setup = Setup(SMALL, 1, 1, 1, 1, False, "fp32", "fp32", False, True)
    memory = plan(setup, GPUS["a100-80gb"], 0.4)["bytes_per_gpu"]
    assert (memory["optimizer"], memory["gradients"]) == (moments, gradients)


def test_the_papers_prior_is_12_billion_parameters_and_fits_1024_v100s(tmp_path, capsys):
    result = main(
        [
            "experiment=paper_dalle",
            "trainer=fsdp",
            "trainer.devices=8",
            "trainer.num_nodes=128",
            "trainer.precision=16-mixed",
            f"paths.log_dir={tmp_path}",
            "--gpu",
            "v100-16gb",
        ]
    )
    total = result["parameters"]["total"]
    assert 12.0e9 < total < 12.5e9  # the paper: 12 billion
    assert result["global_batch"] == 1024 and result["steps"] == 430_000
    assert result["sharded_over"] == 1024 and result["fits"]
    per_gpu = result["bytes_per_gpu"]
    assert per_gpu["optimizer"] == 8 * -(-total // 1024)  # AdamW's two fp32 moments, sharded
    assert result["flops_per_token"] > 6 * 12e9
    printed = capsys.readouterr().out
    assert "12.29 B" in printed and "days" in printed
    (written,) = tmp_path.glob("plan/runs/*/metrics.json")
    assert json.loads(written.read_text())["parameters"]["total"] == total


def test_ddp_does_not_shard_and_the_paper_prior_does_not_fit_then():
    setup = Setup(
        PriorConfig(
            dim=3968,
            depth=64,
            heads=62,
            text_vocab=16384,
            text_seq_len=256,
            image_vocab=8192,
            grid_size=32,
        ),
        1,
        8,
        1,
        10,
        False,
        "bf16",
        "fp32",
        False,
        True,
    )
    result = plan(setup, GPUS["h100-80gb"], 0.4)
    assert result["sharded_over"] == 1
    assert result["bytes_per_gpu"]["weights"] == 4 * result["parameters"]["total"]
    assert not result["fits"]


def _saved_bytes(model, text, codes, dtype=None) -> int:
    """Bytes of the tensors autograd keeps for the backward pass (weights excluded)."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(text, codes)
        prior_loss(*out, text, codes, 0.125)[0]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in weights)


@pytest.mark.parametrize(
    ("dtype", "compute", "tolerance"),
    [
        (None, "fp32", 0.05),
        (torch.bfloat16, "bf16", 0.10),  # autocast also keeps bf16 copies of weights
    ],
)
def test_activation_estimate_matches_what_autograd_keeps(dtype, compute, tolerance):
    """Measured on CPU (4 sequences of 288 tokens, 4 blocks of width 256): fp32 within 3%,
    bf16 autocast within 8% (see docs/scaling.md). The checkpointed estimate is not measured
    here: torch's checkpoint keeps the block inputs outside these hooks and its peak is a
    block recomputed during the backward pass."""
    torch.manual_seed(0)
    model = PriorTransformer(SMALL)
    text = torch.randint(0, SMALL.text_vocab, (4, SMALL.text_seq_len))
    codes = torch.randint(0, SMALL.image_vocab, (4, SMALL.image_seq_len))
    measured = _saved_bytes(model, text, codes, dtype)
    setup = Setup(SMALL, 4, 1, 1, 1, False, compute, "fp32", False, True)
    estimate = activation_bytes(setup)["full"]
    assert estimate == pytest.approx(measured, rel=tolerance), (estimate, measured)
