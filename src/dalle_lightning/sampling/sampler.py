"""Sampling image tokens for captions, then images from the dVAE (Ramesh et al., 2021, sec. 2.3).

Image codes are drawn one raster position at a time (temperature, then top-k and/or top-p
filtering, optionally classifier-free guidance) with a seeded `torch.Generator`, so a (seed,
captions) pair always gives the same images. With `use_cache=True` (the default) the
`KVDecoder` runs the prompt once and each later position is one cached step;
`use_cache=False` recomputes the whole sequence per token (the reference the tests compare
against).

Shape legend: B captions x images per caption, T text_seq_len, N = h * w image tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from dalle_lightning.config import ConfigError, require_float, require_int, typed
from dalle_lightning.models.image_tokenizer import ImageTokenizer
from dalle_lightning.models.transformer import PriorTransformer
from dalle_lightning.sampling.kv_decoder import KVDecoder
from dalle_lightning.sampling.speculative_jacobi import speculative_jacobi
from dalle_lightning.sampling.static_decoder import StaticDecoder
from dalle_lightning.text.tokenizer import BPETokenizer


@dataclass(frozen=True)
class SamplingConfig:
    """How image tokens are drawn: `model.sampling` (saved with the prior: what it was trained
    for) and `sampling.*` of evaluate.py (null there: the checkpoint's own). The defaults are
    the plain sampler: temperature 1, unfiltered, unguided."""

    temperature: float = 1.0
    top_k: int | None = None  # keep the k most likely codes
    top_p: float | None = None  # nucleus: the smallest set with probability >= top_p
    cond_scale: float = 1.0  # classifier-free guidance: blank + s * (caption - blank); 1: off
    # > 1: speculative Jacobi decoding, that many codes per forward at most (the same
    # distribution, other draws; speculative_jacobi.py); 0 or 1: one code per forward
    jacobi_window: int = 0

    def __post_init__(self) -> None:
        require_float("temperature", self.temperature, 1e-6)
        require_int("jacobi_window", self.jacobi_window, 0)
        require_float("cond_scale", self.cond_scale, 0.0)
        if self.top_k is not None:
            require_int("top_k", self.top_k, 1)
        if self.top_p is not None:
            require_float("top_p", self.top_p, 1e-6, 1.0)

    @property
    def guided(self) -> bool:
        return self.cond_scale != 1.0


def resolve_sampling(
    requested: Mapping, trained: SamplingConfig, guidance_trained: bool, at: str = "sampling"
) -> SamplingConfig:
    """The settings to sample with: each field of `requested` left None takes the value the
    checkpoint was trained with (`trained`, its model.sampling), the rest as given.

    cond_scale != 1 needs a prior that saw blank captions in training (caption_dropout > 0);
    otherwise its blank-caption logits are meaningless and guidance silently ruins samples.
    """
    given = {key: value for key, value in requested.items() if value is not None}
    resolved = typed(SamplingConfig, {**asdict(trained), **given}, at)
    if resolved.guided and not guidance_trained:
        raise ConfigError(
            f"{at}.cond_scale",
            resolved.cond_scale,
            "1 for this checkpoint: it was trained with model.caption_dropout=0, so it never "
            "saw a blank caption (train with model.caption_dropout=0.1 to use guidance)",
        )
    return resolved


class Samples(NamedTuple):
    codes: Tensor  # (B, N) long
    logits: Tensor | None  # (B, N, image_vocab) before filtering, when keep_logits=True
    forwards: int = 0  # decoder forwards after the prompt's (one per code without jacobi_window)


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Keep the k most likely ids and/or the smallest set with probability >= top_p."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keeps the first id always
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def gumbel_max(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One id per row, drawn from softmax(logits): argmax(logits + Gumbel noise).

    Same distribution as `torch.multinomial(softmax(logits))`, several times faster per
    decoding step on CPU.
    """
    u = torch.rand(logits.shape, generator=generator, device=logits.device)
    tiny = torch.finfo(u.dtype).tiny
    return (logits - torch.log(-torch.log(u.clamp_min(tiny)))).argmax(-1)


@torch.inference_mode()
def sample_codes(
    prior: PriorTransformer,
    text: Tensor,
    sampling: SamplingConfig = SamplingConfig(),
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    keep_logits: bool = False,
    static: StaticDecoder | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Samples:
    """Sample N image codes for each row of text ids (B, T).

    Guidance (`sampling.cond_scale` != 1): the same codes are also fed to a copy of each row
    with a blank caption (all pads) and the logits become blank + s * (caption - blank).
    `sampling.jacobi_window` > 1: speculative Jacobi decoding with windows of that many codes
    (the same distribution, other draws; `speculative_jacobi.py`).
    `static`: decode with this `StaticDecoder` (built for these rows; compiled or not), the
    GPU path, instead of a new `KVDecoder`; it decodes one code per forward (Jacobi windows
    need the KV decoder's `window`, so `jacobi_window` is not used with it).
    `progress(done, N)`: called as codes are drawn (after each code; under Jacobi decoding
    once, at the end).
    """
    B, N = text.shape[0], prior.config.image_seq_len
    if sampling.guided:
        text = torch.cat([text, blank_text(prior, B, text.device)])

    def guide(logits: Tensor) -> Tensor:  # (2B | B, ..., V) -> (B, ..., V)
        logits = logits.float()
        return (
            logits[B:] + sampling.cond_scale * (logits[:B] - logits[B:])
            if sampling.guided
            else logits
        )

    def target(logits: Tensor) -> Tensor:  # what is sampled from, as filtered logits
        if sampling.temperature != 1.0:
            logits = logits / sampling.temperature
        return filter_logits(logits, sampling.top_k, sampling.top_p)

    if sampling.jacobi_window > 1 and use_cache and static is None:
        decoder = KVDecoder(prior, text.shape[0], sampling.jacobi_window)
        copies = 2 if sampling.guided else 1
        out = speculative_jacobi(
            decoder,
            guide(decoder.prefill(text)),
            lambda inputs, starts: guide(
                decoder.window(
                    inputs.repeat(copies, 1),
                    starts if isinstance(starts, int) else starts.repeat(copies),
                )
            ),
            lambda logits: target(logits).softmax(-1),
            lambda probs: gumbel_max(probs.log(), generator),
            sampling.jacobi_window,
            generator,
            keep_logits,
        )
        if progress is not None:
            progress(N, N)
        return Samples(out.codes, out.logits, out.forwards)
    codes = torch.zeros(text.shape[0], N, dtype=torch.long, device=text.device)
    kept = []
    decoder = KVDecoder(prior, text.shape[0]) if use_cache and static is None else None
    T = prior.config.text_seq_len
    for p in range(N):
        if static is not None:
            slot = torch.tensor(T + p, device=text.device)
            logits = static.prefill(text) if p == 0 else static.step_fn(codes[:, p - 1], slot)
        elif decoder is None:
            logits = prior(text, codes).image_logits[:, p]
        elif p == 0:
            logits = decoder.prefill(text)
        else:
            logits = decoder.step(codes[:, p - 1])
        logits = guide(logits)
        if keep_logits:
            kept.append(logits)
        sampled = gumbel_max(target(logits), generator)
        codes[:, p] = sampled.repeat(2) if sampling.guided else sampled
        if progress is not None:
            progress(p + 1, N)
    return Samples(codes[:B], torch.stack(kept, 1) if keep_logits else None, N - 1)


def blank_text(prior: PriorTransformer, rows: int, device: torch.device | str) -> Tensor:
    """(rows, T) text ids of an empty caption: the pad id of every position."""
    c = prior.config
    return (c.text_vocab + torch.arange(c.text_seq_len, device=device)).expand(rows, -1)


@torch.no_grad()
def generate_images(
    prior: PriorTransformer,
    dvae: ImageTokenizer,
    tokenizer: BPETokenizer,
    captions: Sequence[str],
    num_images: int = 1,
    sampling: SamplingConfig = SamplingConfig(),
    seed: int = 0,
    batch_size: int = 64,
    progress: Callable[[float], None] | None = None,
) -> Tensor:
    """(len(captions) * num_images, C, H, W) in [0, 1]: caption i's images are rows
    i * num_images ... (i + 1) * num_images - 1. `progress(fraction)`: called as codes are
    drawn, with the share of all codes drawn so far (0 < fraction <= 1)."""
    require_int("num_images", num_images, 1)
    require_int("batch_size", batch_size, 1)
    device = prior.text_embedding.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    repeated = [c for c in captions for _ in range(num_images)]
    images = []
    starts = range(0, len(repeated), batch_size)
    for batch, start in enumerate(starts):
        text = tokenizer.encode(repeated[start : start + batch_size]).to(device)
        on_step = None
        if progress is not None:

            def on_step(done: int, total: int, batch: int = batch) -> None:
                progress((batch + done / total) / len(starts))

        codes = sample_codes(prior, text, sampling, generator, progress=on_step).codes
        side = dvae.grid_size
        images.append(dvae.decode(codes.view(-1, side, side)).float().cpu())
    return torch.cat(images)
