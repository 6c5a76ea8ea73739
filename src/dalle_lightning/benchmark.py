"""Speed of the four hot paths, printed as one JSON object:

    python -m dalle_lightning.benchmark [--dim 256 --depth 4 --heads 8 --text-seq-len 32
        --image-size 64 --grid 16 --batch 8 --threads 2] [--only generate,prior_train]

prior_train  one AdamW step of the prior on [text | image] tokens: seconds_per_step and
             tokens_per_s = batch x (text_seq_len + grid^2) / seconds_per_step
generate     sampling a full image per caption with the KV cache, plus dVAE decoding:
             seconds_per_batch, images_per_s (complete decoded images per second) and
             codes_per_forward (> 1 with --jacobi-window W: speculative Jacobi decoding);
             --ckpt PATH samples a trained stage-2 checkpoint instead (its prior, dVAE and
             sampling settings, shapes validation captions; reported as ckpt_prior_parameters
             and ckpt_sampling, `config` keeping the random models'); --decoder static |
             static-compiled: the static-shape step (static_decoder.py) instead
dvae_train   one AdamW step of the dVAE (Gumbel-softmax, logit-Laplace + KL): images_per_s
dvae_encode  argmax codes of images: images_per_s
caption_encode  BPE ids of a batch of shapes captions (what a stage-2 training item costs):
             seconds_per_batch without dropout, with our seeded BPE-dropout 0.1 and with HF's
             unseeded one, and the seeded one's share of a prior_train step when both ran

Random weights and inputs (speed does not depend on them); fp32 on CPU, or on the GPU when
`--device cuda`. Timings are medians over `--repeats` runs after `--warmup` runs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, replace

import torch

from dalle_lightning.allocator import keep_freed_memory
from dalle_lightning.data.shapes import ShapesConfig, ShapesDataset
from dalle_lightning.models.dalle import DALLE
from dalle_lightning.models.dvae import DVAE, DVAEConfig
from dalle_lightning.models.transformer import PriorConfig, PriorTransformer
from dalle_lightning.modules.losses import kl_to_uniform, logit_laplace_nll, prior_loss
from dalle_lightning.sampling.sampler import SamplingConfig, sample_codes
from dalle_lightning.sampling.static_decoder import StaticDecoder
from dalle_lightning.text.tokenizer import BPETokenizer

PARTS = ("prior_train", "generate", "dvae_train", "dvae_encode", "caption_encode")
WARMUP, REPEATS = 2, 5  # untimed and timed calls of each part


def parse_args(
    argv: list[str] | None = None, p: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    """The benchmark's flags, checked; `p`: a parser to add them to (a script's own flags)."""
    p = p or argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--text-seq-len", type=int, default=32)
    p.add_argument("--text-vocab", type=int, default=512)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--grid", type=int, default=16, help="image tokens per side")
    p.add_argument("--image-vocab", type=int, default=512)
    p.add_argument("--attention", default="sparse", choices=("full", "sparse"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--malloc",
        default="keep",
        choices=("keep", "default"),
        help="keep: glibc keeps freed memory, as train.py / evaluate.py set it (allocator.py)",
    )
    p.add_argument("--jacobi-window", type=int, default=0, help="generate: codes per forward")
    p.add_argument(
        "--decoder",
        default="kv",
        choices=("kv", "static", "static-compiled"),
        help="generate: the KV decoder (what generation uses), the static-shape step (the GPU "
        "path) eager, or compiled (CUDA graphs on a GPU, Inductor's C++ on CPU)",
    )
    p.add_argument("--ckpt", default=None, help="generate: a trained stage-2 checkpoint")
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument(
        "--only", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS)
    )
    args = p.parse_args(argv)
    if args.decoder != "kv" and args.jacobi_window > 1:
        p.error("--jacobi-window needs --decoder kv (the static step decodes one code a step)")
    unknown = set(args.only.split(",")) - set(PARTS)
    if unknown:
        p.error(
            f"--only: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}"
        )
    ratio = args.image_size / args.grid
    if args.image_size % args.grid or ratio != 2 ** round(math.log2(ratio)):
        p.error(f"--image-size {args.image_size} / --grid {args.grid} must be a power of 2")
    return args


def timed(fn: Callable[[], object], warmup: int, repeats: int, device: str) -> float:
    """Median seconds of one call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(args: argparse.Namespace) -> tuple[PriorTransformer, DVAE]:
    prior = PriorTransformer(
        PriorConfig(
            text_vocab=args.text_vocab,
            text_seq_len=args.text_seq_len,
            image_vocab=args.image_vocab,
            grid_size=args.grid,
            dim=args.dim,
            depth=args.depth,
            heads=args.heads,
            attention=args.attention,
        )
    ).to(args.device)
    group_count = round(math.log2(args.image_size // args.grid)) + 1
    dvae = DVAE(
        DVAEConfig(
            image_size=args.image_size,
            vocab_size=args.image_vocab,
            group_count=group_count,
        )
    ).to(args.device, memory_format=torch.channels_last)
    return prior, dvae


def prior_train_step(prior: PriorTransformer, text, codes) -> Callable[[], None]:
    """The `prior_train` part: one AdamW step on [text | image] tokens, with a fresh AdamW."""
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-4)

    def step() -> None:
        out = prior(text, codes)
        loss = prior_loss(out.text_logits, out.image_logits, text, codes, 1 / 8)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def generate_speed(args: argparse.Namespace, prior, dvae, text, t: Callable) -> dict:
    """The `generate` part: random weights and text, or `args.ckpt`'s model on captions."""
    sampling = SamplingConfig(jacobi_window=args.jacobi_window)
    if args.ckpt is not None:
        model = DALLE.from_checkpoint(args.ckpt, args.device)
        prior, dvae = model.prior, model.dvae
        sampling = replace(model.sampling, jacobi_window=args.jacobi_window)
        dataset = ShapesDataset(ShapesConfig(image_size=dvae.config.image_size), "val", 64)
        captions = [dataset.render(i)[1] for i in range(args.batch)]
        text = model.tokenizer.encode(captions).to(args.device)
    prior.eval()
    B, side = text.shape[0], prior.config.grid_size
    generator = torch.Generator(device=args.device).manual_seed(0)
    forwards: list[int] = []
    static = None
    if args.decoder != "kv":  # built once, as for a stream of batches (compiled in warm-up)
        static = StaticDecoder(prior, B * (2 if sampling.guided else 1))
        if args.decoder == "static-compiled":
            static.compile("reduce-overhead" if args.device.startswith("cuda") else None)

    def generate() -> None:  # what `generate_images` runs for a batch
        sampled = sample_codes(prior, text, sampling, generator, static=static)
        forwards.append(sampled.forwards)
        with torch.inference_mode():
            dvae.decode(sampled.codes.view(B, side, side))

    s = t(generate)
    codes_per_forward = (side * side - 1) / statistics.mean(forwards)
    out = {"seconds_per_batch": s, "images_per_s": B / s, "codes_per_forward": codes_per_forward}
    if args.ckpt is not None:  # `config` below describes the random models; this is the file's
        out["ckpt_prior_parameters"] = sum(p.numel() for p in prior.parameters())
        out["ckpt_sampling"] = asdict(sampling)
    return out


def run(args: argparse.Namespace) -> dict:
    if args.malloc == "keep":
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prior, dvae = build(args)
    B, T, N, dev = args.batch, args.text_seq_len, args.grid**2, args.device
    text = torch.randint(0, args.text_vocab + T, (B, T), device=dev)
    codes = torch.randint(0, args.image_vocab, (B, N), device=dev)
    images = torch.rand(B, 3, args.image_size, args.image_size, device=dev).contiguous(
        memory_format=torch.channels_last
    )
    wanted = args.only.split(",")
    result: dict = {}
    t = lambda fn: timed(fn, args.warmup, args.repeats, dev)  # noqa: E731

    if "prior_train" in wanted:
        prior.train()
        s = t(prior_train_step(prior, text, codes))
        result["prior_train"] = {"seconds_per_step": s, "tokens_per_s": B * (T + N) / s}

    if "generate" in wanted:
        result["generate"] = generate_speed(args, prior, dvae, text, t)

    if "dvae_train" in wanted:
        opt = torch.optim.AdamW(dvae.parameters(), lr=1e-4)
        subpixels = images[0].numel()

        def dvae_step() -> None:
            out = dvae(images, tau=1.0)
            nll = logit_laplace_nll(out.stats, images) / subpixels
            loss = (nll + 6.6 * kl_to_uniform(out.logits) / subpixels).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        s = t(dvae_step)
        result["dvae_train"] = {"seconds_per_step": s, "images_per_s": B / s}

    if "dvae_encode" in wanted:
        s = t(lambda: dvae.encode(images))
        result["dvae_encode"] = {"images_per_s": B / s}

    if "caption_encode" in wanted:
        captions = [ShapesDataset(ShapesConfig(), "train", 512).render(i)[1] for i in range(512)]
        tokenizer = BPETokenizer.train(captions, args.text_vocab, T)
        batches = [captions[i : i + B] for i in range(0, len(captions) - B + 1, B)]

        def encode_all(dropout: float) -> None:
            for batch in batches:
                tokenizer.encode(batch, dropout)

        def hf_dropout_all() -> None:  # HF's own BPE-dropout (unseeded), for comparison
            tokenizer.tokenizer.model.dropout = 0.1
            try:
                encode_all(0.0)
            finally:
                tokenizer.tokenizer.model.dropout = None

        per_batch = lambda s: s / len(batches)  # noqa: E731
        seeded = per_batch(t(lambda: encode_all(0.1)))
        result["caption_encode"] = {
            "seconds_per_batch_no_dropout": per_batch(t(lambda: encode_all(0.0))),
            "seconds_per_batch_seeded_dropout": seeded,
            "seconds_per_batch_hf_dropout": per_batch(t(hf_dropout_all)),
        }
        if "prior_train" in result:
            share = seeded / result["prior_train"]["seconds_per_step"]
            result["caption_encode"]["seeded_share_of_prior_step"] = share

    result["config"] = {
        **{k: v for k, v in vars(args).items() if k != "only"},
        "parts": wanted,
        "prior_parameters": sum(p.numel() for p in prior.parameters()),
        "dvae_parameters": sum(p.numel() for p in dvae.parameters()),
        "dtype": "float32",
        "torch": torch.__version__,
    }
    return result


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(parse_args(argv)), indent=2))


if __name__ == "__main__":
    main()
