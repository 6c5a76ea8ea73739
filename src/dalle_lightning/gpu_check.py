"""`python -m dalle_lightning.gpu_check`: mixed precision and FSDP2 on the GPUs this machine
has, checked against the CPU: 30 s for parts 1, 2 and 4 on one H200 (2026-12-04).

1. Agreement: a tiny prior trains 6 AdamW steps on fixed tokens on the CPU in fp32 (the
   reference) and on the GPU in fp32 (TF32 off), bf16 autocast and fp16 autocast with a
   GradScaler. The fp32 losses must agree to 1e-3 and the mixed ones to 5%, and the logits
   must stay fp32 under autocast (the paper's fp32 islands).
2. Speed and memory: the prior at the stated size (default dim 1024, depth 12, 16 heads,
   128 text + 32 x 32 image tokens, batch 8): tokens/s, MFU against the GPU's dense peak, and
   peak memory next to the planner's estimate (`plan.py`), for bf16-mixed and 16-mixed.
3. FSDP2 (with 2 or more GPUs): `train.py model=dalle trainer=fsdp trainer.devices=2` on a
   tiny prior against the one-GPU run of the same global batch (`trainer=gpu`), under
   bf16-mixed and 16-mixed: val/loss within 2%.
4. Decoding: images/s at the benchmark's reference config (dim 256, depth 4, 8 heads, 32 text
   + 16 x 16 image tokens, batch 8) with the KV decoder, the static-shape step eager, and the
   static step under torch.compile(mode="reduce-overhead") (CUDA graphs; GPU only, with the
   number of graphs Inductor skipped); every step's logits on fixed codes must equal the KV
   decoder's to 1e-3.

Exit code 1 on any mismatch, 2 when no CUDA GPU is visible (`--device cpu` runs parts 1, 2, 4 on
the CPU, tiny, which is what tests/test_gpu_check.py does). Figures go to docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from dalle_lightning.benchmark import timed
from dalle_lightning.models.transformer import PriorConfig, PriorTransformer
from dalle_lightning.modules.losses import prior_loss
from dalle_lightning.plan import GIB, Setup, activation_bytes, prior_parameters
from dalle_lightning.sampling.kv_decoder import KVDecoder
from dalle_lightning.sampling.sampler import SamplingConfig, sample_codes
from dalle_lightning.sampling.static_decoder import StaticDecoder

PEAK_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "V100": 125, "L40S": 362, "A10": 125}
PRECISIONS = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
TINY = PriorConfig(
    text_vocab=64, text_seq_len=8, image_vocab=32, grid_size=4, dim=64, depth=2, heads=4
)


def train_steps(
    config: PriorConfig, batch: int, device: str, precision: str, steps: int, seed: int = 0
) -> dict:
    """`steps` AdamW steps on fixed random tokens; losses, logits dtype, tokens/s, peak bytes."""
    torch.manual_seed(seed)
    model = PriorTransformer(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dtype = PRECISIONS[precision]
    scaler = torch.amp.GradScaler(device, enabled=dtype is torch.float16)
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, config.text_vocab, (batch, config.text_seq_len), generator=g)
    codes = torch.randint(0, config.image_vocab, (batch, config.image_seq_len), generator=g)
    text, codes = text.to(device), codes.to(device)
    losses, logits_dtypes, started = [], set(), 0.0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        if step == 1:  # the first step warms up kernels and the allocator
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(text, codes)
            loss = prior_loss(*out, text, codes, 0.125)[0]
        logits_dtypes |= {str(out.text_logits.dtype), str(out.image_logits.dtype)}
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    tokens = batch * config.seq_len * (steps - 1)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {
        "losses": losses,
        "logits_dtypes": sorted(logits_dtypes),
        "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
        "peak_bytes": peak,
    }


def agreement(device: str) -> tuple[dict, list[str]]:
    """Part 1: the tiny prior's loss after 6 steps on `device` against the CPU's fp32."""
    reference = train_steps(TINY, 8, "cpu", "32-true", 6)["losses"][-1]
    results, problems = {"cpu 32-true": reference}, []
    for precision in PRECISIONS:
        if precision == "16-mixed" and device == "cpu":
            continue  # fp16 autocast with a GradScaler is for GPUs (check_trainer refuses it)
        run = train_steps(TINY, 8, device, precision, 6)
        loss = run["losses"][-1]
        results[f"{device} {precision}"] = loss
        tolerance = 1e-3 if precision == "32-true" else 5e-2
        if abs(loss - reference) > tolerance * abs(reference):
            problems.append(f"{device} {precision}: loss {loss:.6f} vs CPU fp32 {reference:.6f}")
        if run["logits_dtypes"] != ["torch.float32"]:
            problems.append(f"{device} {precision}: logits in {run['logits_dtypes']}, not fp32")
    return results, problems


def peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def speed(config: PriorConfig, batch: int, device: str, steps: int) -> dict:
    """Part 2: tokens/s, MFU and peak memory of the stated prior under mixed precision."""
    params = prior_parameters(config)
    flops_per_token = 6 * (params["total"] - params["embeddings"]) + 12 * (
        config.depth * config.seq_len * config.dim
    )
    peak = peak_tflops(device)
    out = {"parameters": params["total"], "flops_per_token": flops_per_token}
    for precision in ("bf16-mixed", "16-mixed") if device == "cuda" else ("bf16-mixed",):
        run = train_steps(config, batch, device, precision, steps)
        compute = "bf16" if precision == "bf16-mixed" else "fp16"
        setup = Setup(config, batch, 1, 1, steps, False, compute, "fp32", False, True)
        planned = 16 * params["total"] + activation_bytes(setup)["full"]
        tps = run["tokens_per_s"]
        out[precision] = {
            "tokens_per_s": tps,
            "mfu": tps * flops_per_token / (peak * 1e12) if peak and tps else None,
            "peak_gib": run["peak_bytes"] / GIB if run["peak_bytes"] else None,
            "planned_gib": planned / GIB,
        }
    return out


def decoding(device: str, problems: list[str], batch: int = 8, repeats: int = 3) -> dict:
    """Part 4: the decoders' images/s (sampling only, no dVAE) and agreement on fixed codes."""
    torch.manual_seed(0)
    config = PriorConfig(text_vocab=512, text_seq_len=32, image_vocab=512, grid_size=16)
    prior = PriorTransformer(config).to(device).eval()
    text = torch.randint(0, config.text_vocab, (batch, config.text_seq_len), device=device)
    codes = torch.randint(0, config.image_vocab, (batch, config.image_seq_len), device=device)
    variants: dict[str, StaticDecoder | None] = {
        "kv_decoder": None,
        "static": StaticDecoder(prior, batch),
    }
    if device == "cuda":
        variants["static_compiled"] = StaticDecoder(prior, batch).compile("reduce-overhead")
    out: dict = {}
    with torch.inference_mode():
        reference = KVDecoder(prior, batch)
        expected = [reference.prefill(text)]
        expected += [reference.step(codes[:, p - 1]) for p in range(1, config.image_seq_len)]
        for name, static in variants.items():
            if static is not None:
                T = config.text_seq_len
                got = [static.prefill(text)]
                for p in range(1, config.image_seq_len):
                    slot = torch.tensor(T + p, device=device)
                    got.append(static.step_fn(codes[:, p - 1], slot).clone())
                diff = (torch.stack(got, 1) - torch.stack(expected, 1)).abs().max().item()
                if diff > 1e-3:
                    problems.append(f"decoding {name}: logits differ by {diff:.2e}")
            else:
                diff = 0.0

            def generate(static: StaticDecoder | None = static) -> None:
                generator = torch.Generator(device=device).manual_seed(0)
                sample_codes(prior, text, SamplingConfig(), generator, static=static)

            first = timed(generate, 0, 1, device)  # the warm-up (and compilation)
            seconds = timed(generate, 0, repeats, device)
            out[name] = {"images_per_s": batch / seconds, "first_call_s": first, "max_diff": diff}
    if "static_compiled" in out:  # graphs Inductor ran without CUDA graphs (0: none)
        skips = counters["inductor"]["cudagraph_skips"]
        out["static_compiled"]["cudagraph_skips"] = skips
        if skips:  # each reason is logged with TORCH_LOGS=cudagraphs
            out["static_compiled"]["inductor_counters"] = dict(counters["inductor"])
    return out


def fsdp2(problems: list[str]) -> dict:
    """Part 3: train.py under trainer=fsdp on 2 GPUs against one GPU, same global batch, in
    bf16-mixed and 16-mixed."""
    losses = {}
    for precision in ("bf16-mixed", "16-mixed"):
        runs = _fsdp2_against_one_gpu(problems, precision)
        losses |= {f"{name} {precision}": loss for name, loss in runs.items()}
        if len(runs) == 2:
            fsdp, plain = runs.values()
            if abs(fsdp - plain) > 0.02 * abs(plain):
                problems.append(f"FSDP2 {precision} val/loss {fsdp} vs one GPU {plain}")
    return losses


def _fsdp2_against_one_gpu(problems: list[str], precision: str) -> dict:
    root = Path(__file__).resolve().parents[2]
    common = [
        "model=dalle", "model.caption_dropout=0",
        "model.sampling.cond_scale=1", "trainer.max_steps=6", "trainer.val_check_interval=6",
        f"trainer.precision={precision}", "logger=csv", "test=false", "dataset.image_size=32",
        "dataset.num_train=64", "dataset.num_val=16", "model.net.dim=64", "model.net.depth=2",
        "model.net.heads=4", "model.text.vocab_size=64", "model.text.text_seq_len=16",
    ]  # fmt: skip
    losses = {}
    with tempfile.TemporaryDirectory() as tmp:
        dvae = Path(tmp) / "dvae.pt"
        _tiny_dvae(dvae)
        common += [f"model.dvae_ckpt={dvae}", f"paths.cache_dir={tmp}/cache"]
        for name, extra in (
            ("fsdp2", ["trainer=fsdp", "trainer.devices=2", "dataset.batch_size=4"]),
            ("one gpu", ["trainer=gpu", "trainer.devices=1", "dataset.batch_size=8"]),
        ):
            log_dir = Path(tmp) / name.replace(" ", "_")
            command = [sys.executable, str(root / "train.py"), *common, *extra]
            done = subprocess.run(
                [*command, f"paths.log_dir={log_dir}"], capture_output=True, text=True
            )
            if done.returncode != 0:
                problems.append(f"{name} {precision}: train.py failed: {done.stderr[-800:]}")
                return losses
            (summary,) = log_dir.glob("train_dalle/runs/*/metrics.json")
            losses[name] = json.loads(summary.read_text())["metrics"]["val/loss"]
    return losses


def _tiny_dvae(path: Path) -> None:
    from dalle_lightning.checkpoints import export_dvae
    from dalle_lightning.models.dvae import DVAE, DVAEConfig

    torch.manual_seed(0)
    torch.save(export_dvae(DVAE(DVAEConfig(image_size=32, n_hid=8, n_init=8, vocab_size=32))), path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m dalle_lightning.gpu_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU is visible (--device cpu checks the CPU parts)", file=sys.stderr)
        raise SystemExit(2)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in part 1
    torch.backends.cudnn.allow_tf32 = False
    config = PriorConfig(
        text_vocab=16384, text_seq_len=128, image_vocab=8192, grid_size=32,
        dim=args.dim, depth=args.depth, heads=args.heads, attention="sparse",
    )  # fmt: skip
    report: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    started = time.perf_counter()

    def done(part: str) -> None:  # each part's figures as it ends, on stderr
        seconds = time.perf_counter() - started
        print(f"[{seconds:.0f} s] {part}: {json.dumps(report[part])}", file=sys.stderr, flush=True)

    report["agreement"], problems = agreement(args.device)
    done("agreement")
    report["speed"] = speed(config, args.batch, args.device, args.steps)
    done("speed")
    report["decoding"] = decoding(args.device, problems)
    done("decoding")
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    report["fsdp2"] = fsdp2(problems) if gpus >= 2 else "skipped: fewer than 2 GPUs"
    done("fsdp2")
    report["problems"] = problems
    print(json.dumps(report, indent=2))
    if problems:
        print("MISMATCH:\n  " + "\n  ".join(problems), file=sys.stderr)
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
