"""This project against lucidrains' dalle-pytorch 1.6.6 at the benchmark's sizes, interleaved:

    pip install --no-deps dalle-pytorch==1.6.6 axial-positional-embedding rotary-embedding-torch
    python -m dalle_lightning.compare_dalle_pytorch [--rounds 3 --per-round 8] [benchmark flags]
        [--only generate|prior_train]

Prints one JSON object: per round, the median seconds of `--per-round` calls of each side, one
side after the other, and their ratio, for
- generate: a batch of images (ours: `benchmark`'s `generate` part, the KV decoder and the
  dVAE decode; theirs: `DALLE.generate_images(..., use_cache=True, filter_thres=0)` and its
  `DiscreteVAE` decode). dalle-pytorch 1.6.6 drops the cache when `cond_scale == 1` (its
  `forward_with_cond_scale` does not pass it on) and then recomputes the whole sequence for
  every token; the comparison patches that one method so its cache works.
- prior_train: one AdamW step on [text | image] tokens (theirs: `return_loss=True`).

Both sides get random weights, plain sampling (temperature 1, unfiltered, unguided) and the
same sizes (`--dim --depth --heads --text-seq-len --grid --batch --threads`); ours runs
`--attention` (sparse by default, the paper's), theirs `attn_types=("full",)`. With
`--jacobi-window W` ours samples by speculative Jacobi decoding (the same distribution; random
weights, whose distributions are flat, keep more guesses than a trained prior's do).

dalle-pytorch is not a dependency: it pins old packages and imports modules this comparison
never uses (taming's VQGAN, `pkg_resources`, `requests`). Those missing at import time are
replaced by empty modules first, so `--no-deps` is enough.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import types
from collections.abc import Callable

import torch

from dalle_lightning import benchmark

COMPARED = ("generate", "prior_train")  # the benchmark's parts both sides have


def import_dalle_pytorch() -> types.ModuleType:
    """dalle_pytorch.dalle_pytorch, with the modules it imports but this never uses stubbed."""
    if importlib.util.find_spec("dalle_pytorch") is None:
        raise SystemExit(
            "dalle-pytorch is not installed: pip install --no-deps dalle-pytorch==1.6.6 "
            "axial-positional-embedding rotary-embedding-torch"
        )
    missing = {
        n for n in ("pkg_resources", "requests", "taming") if not importlib.util.find_spec(n)
    }

    def stub(name: str, **attrs: object) -> None:
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module

    if "pkg_resources" in missing:  # its __init__ reads its own version
        stub("pkg_resources", get_distribution=lambda name: types.SimpleNamespace(version=""))
    if "requests" in missing:  # vae.py downloads OpenAI's / VQGAN weights with it
        stub("requests")
    if "taming" in missing:  # vae.py's VQGanVAE
        stub("taming")
        stub("taming.models")
        stub("taming.models.vqgan", VQModel=type("VQModel", (), {}), GumbelVQ=type("G", (), {}))
    import dalle_pytorch.dalle_pytorch as dp

    def forward_with_cond_scale(self, *args, cond_scale=1, cache=None, **kwargs):
        if cond_scale != 1:
            raise NotImplementedError("the comparison samples unguided")
        return self(*args, cache=cache, **kwargs)  # 1.6.6 drops `cache` here

    dp.DALLE.forward_with_cond_scale = forward_with_cond_scale
    return dp


def compare(args: argparse.Namespace) -> dict:
    dp = import_dalle_pytorch()
    benchmark.keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prior, dvae = benchmark.build(args)
    B, T, N = args.batch, args.text_seq_len, args.grid**2
    vae = dp.DiscreteVAE(
        image_size=args.image_size,
        num_tokens=args.image_vocab,
        codebook_dim=256,
        num_layers=int(math.log2(args.image_size // args.grid)),
        hidden_dim=64,
    )
    theirs = dp.DALLE(
        dim=args.dim,
        vae=vae,
        num_text_tokens=args.text_vocab,
        text_seq_len=T,
        depth=args.depth,
        heads=args.heads,
        dim_head=args.dim // args.heads,
        attn_types=("full",),
    )
    if theirs.image_seq_len != N:
        raise SystemExit(f"dalle-pytorch's grid is {theirs.image_seq_len} codes, ours {N}")
    text = torch.randint(0, args.text_vocab + T, (B, T))
    their_text = torch.randint(1, args.text_vocab, (B, T))  # 0 is its padding
    codes = torch.randint(0, args.image_vocab, (B, N))
    our_step = benchmark.prior_train_step(prior, text, codes)  # what `benchmark` times
    their_params = [p for n, p in theirs.named_parameters() if not n.startswith("vae.")]
    their_opt = torch.optim.AdamW(their_params, lr=1e-4)

    def their_step() -> None:
        loss = theirs(their_text, codes, return_loss=True)
        their_opt.zero_grad(set_to_none=True)
        loss.backward()
        their_opt.step()

    def their_generate() -> None:
        with torch.no_grad():
            theirs.generate_images(their_text, filter_thres=0.0, use_cache=True)

    def median_seconds(fn: Callable[[], object]) -> float:  # per round, no warm-up
        return benchmark.timed(fn, 0, args.per_round, args.device)

    def our_generate() -> float:  # benchmark's own `generate`, timed here
        return benchmark.generate_speed(args, prior, dvae, text, median_seconds)[
            "seconds_per_batch"
        ]

    wanted = args.only.split(",")
    result: dict = {part: [] for part in COMPARED if part in wanted}
    prior.eval()
    theirs.eval()
    if "generate" in wanted:
        their_generate()  # warm-up (ours warms up in its first round)
        for _ in range(args.rounds):
            ours, their = our_generate(), median_seconds(their_generate)
            result["generate"].append(
                {"ours_s": ours, "dalle_pytorch_s": their, "ratio": their / ours}
                | {"ours_images_per_s": B / ours, "dalle_pytorch_images_per_s": B / their}
            )
    prior.train()
    theirs.train()
    if "prior_train" in wanted:
        our_step()  # warm-up
        their_step()
        for _ in range(args.rounds):
            ours, their = median_seconds(our_step), median_seconds(their_step)
            result["prior_train"].append(
                {"ours_s": ours, "dalle_pytorch_s": their, "ratio": their / ours}
                | {
                    "ours_tokens_per_s": B * (T + N) / ours,
                    "dalle_pytorch_tokens_per_s": B * (T + N) / their,
                }
            )
    result["config"] = {
        **{k: v for k, v in vars(args).items() if k not in ("only", "ckpt", "warmup", "repeats")},
        "torch": torch.__version__,
        "ours_parameters": sum(p.numel() for p in prior.parameters()),
        "dalle_pytorch_transformer_parameters": sum(p.numel() for p in their_params),
    }
    return result


def main(argv: list[str] | None = None) -> None:
    own = argparse.ArgumentParser(
        description="This project against lucidrains' dalle-pytorch 1.6.6, rounds alternating; "
        "prints JSON. The benchmark's flags set the sizes."
    )
    own.add_argument("--rounds", type=int, default=3, help="rounds, each side once per round")
    own.add_argument("--per-round", type=int, default=8, help="calls timed per side and round")
    args = benchmark.parse_args(argv, own)
    if args.ckpt is not None or args.decoder != "kv":
        raise SystemExit(
            "the comparison runs random weights and the KV decoder: drop --ckpt and --decoder"
        )
    if (args.warmup, args.repeats) != (benchmark.WARMUP, benchmark.REPEATS):
        raise SystemExit(
            "the comparison times --per-round calls per side in each of --rounds rounds: "
            "use those instead of --warmup and --repeats"
        )
    if args.only == ",".join(benchmark.PARTS):  # the benchmark's default: every part
        args.only = ",".join(COMPARED)
    others = set(args.only.split(",")) - set(COMPARED)
    if others:
        raise SystemExit(
            f"--only: the comparison times {' and '.join(COMPARED)}, not "
            f"{', '.join(sorted(others))}"
        )
    print(json.dumps(compare(args), indent=2))


if __name__ == "__main__":
    main()
