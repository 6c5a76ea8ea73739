"""`python -m dalle_lightning.plan [--gpu G] [--mfu F] OVERRIDES...`: memory, FLOPs and days of
a stage-2 training run, worked out on paper before any GPU is booked.

The overrides are train.py's (`experiment=paper_dalle trainer=fsdp trainer.devices=8
trainer.num_nodes=128 ...`). The prior is instantiated on the meta device (no memory, no
weights), so its parameter count is exact; the rest is arithmetic on it, per GPU:

- weights, gradients, AdamW's two moments: fp32, sharded over all ranks under trainer=fsdp
  (FSDP2), whole on every rank otherwise; plus the gathered compute-dtype copies FSDP2 holds
  while running (two units with prefetch, and the root, kept gathered);
- activations per micro-batch (`dataset.batch_size` sequences), the tensors autograd keeps for
  the backward pass: per block 2 residual-stream copies (LayerNorm inputs) and 14 compute-dtype
  D-wide copies (LayerNorm outputs, q/k/v, attention output, MLP 4D in and out), SDPA keeping
  no S x S scores; with activation checkpointing only each block's input, plus one block's
  while it is recomputed; plus the fp32 logits and their softmax. `tests/test_plan.py` checks
  this against the bytes autograd saves in small CPU runs;
- FLOPs per token: 6 x (non-embedding parameters) + 12 x depth x S x D for a training step
  (the attention masks are applied to dense S x S scores); x 4/3 more with activation
  checkpointing (a second forward), which MFU does not count;
- days for `trainer.max_steps` steps of the global batch on the chosen GPU at the given MFU.

Written to logs/plan/runs/<time>/metrics.json as well as printed.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from dalle_lightning.cli import check_group_choices, exit_on_user_error
from dalle_lightning.config import ConfigError, require, require_int, typed
from dalle_lightning.models.transformer import PriorConfig, PriorTransformer
from dalle_lightning.modules.fsdp2_options import compute_dtype_name
from dalle_lightning.runs import register_resolvers

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
GIB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    tflops: dict  # dense tensor-core peak, by compute dtype name


GPUS = {  # vendor datasheets, dense (no sparsity)
    "v100-16gb": GPU("V100 16 GB (the paper's)", 16, {"fp16": 125, "bf16": 125, "fp32": 15.7}),
    "a100-80gb": GPU("A100 80 GB SXM", 80, {"fp16": 312, "bf16": 312, "fp32": 19.5}),
    "h100-80gb": GPU("H100 80 GB SXM", 80, {"fp16": 989, "bf16": 989, "fp32": 67}),
}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Setup:
    """What the plan reads from the composed config."""

    prior: PriorConfig
    micro_batch: int
    ranks: int
    accumulate: int
    max_steps: int
    sharded: bool  # trainer=fsdp (FSDP2)
    compute: str  # fp32 | bf16 | fp16: what the blocks' matmuls run in
    residual: str  # dtype of the residual stream (LayerNorm inputs)
    activation_checkpointing: bool
    reshard_after_forward: bool


def prior_parameters(config: PriorConfig) -> dict[str, int]:
    """Exact parameter counts of the prior, from the module built on the meta device."""
    with torch.device("meta"):
        prior = PriorTransformer(config)
    blocks = sum(p.numel() for p in prior.blocks.parameters())
    embeddings = sum(
        p.numel()
        for m in prior.modules()
        if isinstance(m, torch.nn.Embedding)
        for p in m.parameters()
    )
    heads = sum(
        p.numel()
        for head in (prior.to_text_logits, prior.to_image_logits)
        for p in head.parameters()
    )
    total = sum(p.numel() for p in prior.parameters())
    return {
        "total": total,
        "blocks": blocks,
        "block": blocks // config.depth,
        "embeddings": embeddings,
        "heads": heads,
        "root": total - blocks - heads,  # embeddings and the final norm
    }


def activation_bytes(setup: Setup) -> dict[str, int]:
    """Bytes autograd keeps per micro-batch, with and without activation checkpointing."""
    c = setup.prior
    tokens = setup.micro_batch * c.seq_len
    r, k = DTYPE_BYTES[setup.residual], DTYPE_BYTES[setup.compute]
    block = tokens * c.dim * (2 * r + (6 + 2 * c.mlp_ratio) * k)
    embeddings = tokens * c.dim * r  # the stream entering the first block
    final_norm = tokens * c.dim * (r + k)  # norm input, head input
    vocab = c.text_seq_len * (c.text_vocab + c.text_seq_len) + c.image_seq_len * c.image_vocab
    logits = setup.micro_batch * vocab * 4 * 2  # fp32 logits and their softmax
    full = embeddings + c.depth * block + final_norm + logits
    checkpointed = embeddings + c.depth * tokens * c.dim * r + block + final_norm + logits
    return {"block": block, "logits": logits, "full": full, "checkpointed": checkpointed}


def plan(setup: Setup, gpu: GPU, mfu: float) -> dict:
    params = prior_parameters(setup.prior)
    c, P = setup.prior, params["total"]
    shards = setup.ranks if setup.sharded else 1
    per_rank = -(-P // shards)  # ceil: FSDP2 pads the last shard
    k = DTYPE_BYTES[setup.compute]
    gathered = 0
    if setup.sharded:  # compute-dtype copies alive at once: the root, a unit and the next one
        units = 2 if setup.reshard_after_forward else c.depth
        gathered = (params["root"] + units * params["block"] + params["heads"]) * k
    acts = activation_bytes(setup)
    activations = acts["checkpointed" if setup.activation_checkpointing else "full"]
    memory = {
        "weights": 4 * per_rank,
        "gradients": 4 * per_rank,
        "optimizer": 8 * per_rank,
        "gathered_weights": gathered,
        "activations": activations,
    }
    memory["total"] = sum(memory.values())
    non_embedding = P - params["embeddings"]
    model_flops = 6 * non_embedding + 12 * c.depth * c.seq_len * c.dim  # per token, fwd + bwd
    hardware_flops = model_flops * (4 / 3 if setup.activation_checkpointing else 1)
    global_batch = setup.micro_batch * setup.ranks * setup.accumulate
    step_flops = model_flops * global_batch * c.seq_len
    peak = gpu.tflops[setup.compute] * 1e12
    step_s = hardware_flops / model_flops * step_flops / (setup.ranks * peak * mfu)
    return {
        "gpu": gpu.name,
        "mfu": mfu,
        "ranks": setup.ranks,
        "sharded_over": shards,
        "global_batch": global_batch,
        "parameters": params,
        "bytes_per_gpu": memory,
        "bytes_all_gpus": {name: value * setup.ranks for name, value in memory.items()},
        "activations_without_checkpointing": acts["full"],
        "activations_with_checkpointing": acts["checkpointed"],
        "fits": memory["total"] <= gpu.memory_gib * GIB,
        "flops_per_token": model_flops,
        "flops_per_step": step_flops,
        "step_seconds": step_s,
        "steps": setup.max_steps,
        "days": setup.max_steps * step_s / 86400,
        "setup": {k: v for k, v in asdict(setup).items() if k != "prior"} | {"prior": asdict(c)},
    }


def setup_from(cfg: DictConfig, image_vocab: int, grid_size: int | None) -> Setup:
    """The Setup of a composed train config (model=dalle)."""
    target = str(OmegaConf.select(cfg, "model._target_", default=""))
    require(target.endswith("DalleModule"), "model", target, "dalle: the planner plans the prior")
    t = cfg.trainer
    devices, nodes = t.get("devices"), t.get("num_nodes", 1)
    require_int("trainer.devices", devices, 1)
    require_int("trainer.num_nodes", nodes, 1)
    image_size = cfg.dataset.image_size
    grid = grid_size or image_size // 8  # the dVAE downsamples 8x (4 groups)
    text = cfg.model.text
    prior = typed(
        PriorConfig,
        OmegaConf.to_container(cfg.model.net),
        "model.net",
        text_vocab=text.vocab_size,
        text_seq_len=text.text_seq_len,
        image_vocab=image_vocab,
        grid_size=grid,
    )
    strategy = t.get("strategy")
    sharded = isinstance(strategy, DictConfig) and str(strategy.get("_target_", "")).endswith(
        "FSDP2Strategy"
    )
    precision = str(t.get("precision", "32-true"))
    param_dtype = strategy.get("param_dtype", "auto") if sharded else "auto"
    dtype = compute_dtype_name(param_dtype, precision)
    # autocast alone keeps the residual stream fp32; FSDP2's param dtype makes it the compute's
    residual = dtype if sharded or precision.endswith("-true") else "fp32"
    return Setup(
        prior=prior,
        micro_batch=cfg.dataset.batch_size,
        ranks=devices * nodes,
        accumulate=t.get("accumulate_grad_batches", 1),
        max_steps=t.max_steps,
        sharded=sharded,
        compute=dtype,
        residual=residual,
        activation_checkpointing=bool(sharded and strategy.get("activation_checkpointing")),
        reshard_after_forward=bool(not sharded or strategy.get("reshard_after_forward", True)),
    )


def compose_train(overrides: list[str]) -> DictConfig:
    register_resolvers()
    check_group_choices(overrides, CONF_DIR)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="plan"):
        return compose(config_name="train", overrides=overrides)


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def report(result: dict) -> str:
    p, m = result["parameters"], result["bytes_per_gpu"]
    s = result["setup"]
    lines = [
        f"prior: {p['total']:,} parameters ({p['total'] / 1e9:.2f} B; blocks {p['blocks']:,}, "
        f"embeddings {p['embeddings']:,}, heads {p['heads']:,})",
        f"ranks {result['ranks']} (sharded over {result['sharded_over']}), micro-batch "
        f"{s['micro_batch']}, global batch {result['global_batch']}, compute {s['compute']}, "
        f"activation checkpointing {s['activation_checkpointing']}",
        "per GPU:",
        *(f"  {name:<17} {_gib(value):>14}" for name, value in m.items()),
        f"  activations without / with checkpointing: "
        f"{_gib(result['activations_without_checkpointing'])} / "
        f"{_gib(result['activations_with_checkpointing'])}",
        f"  fits on {result['gpu']}: {'yes' if result['fits'] else 'NO'}",
        f"all {result['ranks']} GPUs: {_gib(result['bytes_all_gpus']['total'])} (weights, "
        f"gradients and AdamW state {_gib(16 * p['total'])})",
        f"FLOPs per token {result['flops_per_token']:.3e}, per step {result['flops_per_step']:.3e}",
        f"{result['steps']:,} steps at MFU {result['mfu']:.0%}: {result['step_seconds']:.2f} s per "
        f"step, {result['days']:,.1f} days",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m dalle_lightning.plan", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--gpu", choices=sorted(GPUS), default="a100-80gb")
    parser.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilisation")
    parser.add_argument("--image-vocab", type=int, default=8192, help="the dVAE's codes")
    parser.add_argument("--grid-size", type=int, default=None, help="default image_size / 8")
    args, overrides = parser.parse_known_args(argv)
    with exit_on_user_error():
        if not 0 < args.mfu <= 1:
            raise ConfigError("--mfu", args.mfu, "a fraction in (0, 1]")
        cfg = compose_train(overrides)
        result = plan(setup_from(cfg, args.image_vocab, args.grid_size), GPUS[args.gpu], args.mfu)
    result["overrides"] = overrides
    print(report(result))
    out = Path(cfg.paths.log_dir) / "plan" / "runs" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out / 'metrics.json'}")
    return result


if __name__ == "__main__":
    main()
