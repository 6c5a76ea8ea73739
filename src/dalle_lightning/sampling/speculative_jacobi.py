"""Speculative Jacobi decoding: several image codes per forward of the prior, with the same
sampling distribution as one code per step (Teng et al., 2024, "Accelerating Auto-regressive
Text-to-Image Generation with Training-free Speculative Jacobi Decoding").

Each iteration feeds a window of L guessed codes to the cached decoder in one forward
(`KVDecoder.window`), which gives the target distribution p of every position in the window,
each conditioned on the guesses before it. The guesses are then verified left to right as in
speculative sampling: guess x at a position, drawn from q, is kept with probability
min(1, p(x) / q(x)); the first one refused is replaced by a draw from max(0, p - q)
(renormalised), which makes every kept code an exact draw from p given the codes before it.
The guesses after it are not thrown away but redrawn from this forward's p (the Jacobi
update: once their prefix is settled, p no longer changes and they are kept with probability
1), and new positions entering the window start as uniform guesses.

A batch moves together: the cache takes as many codes as the row that settled the fewest
(its kept guesses +1, the corrected code). A row that settled more carries its extra codes
into the next window as guesses with q = p, the distribution they were settled under; the
next forward computes the same p for them, so they are kept with probability 1 (up to
rounding, which the rule absorbs) and the row's lead is not lost. Each row is an exact draw.
`tests/test_speculative_jacobi.py` compares the sampled distribution with the exact one on a
small prior.

Shape legend: B rows, L window, V image vocabulary, N image tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from dalle_lightning.sampling.kv_decoder import KVDecoder


class JacobiCodes(NamedTuple):
    codes: Tensor  # (B, N) long
    logits: Tensor | None  # (B, N, V) the logits each kept code was verified against
    forwards: int  # decoder forwards after the prompt's (plain decoding: N - 1)


def speculative_jacobi(
    decoder: KVDecoder,
    first_logits: Tensor,
    logits_of: Callable[[Tensor], Tensor],
    target: Callable[[Tensor], Tensor],
    draw: Callable[[Tensor], Tensor],
    window: int,
    generator: torch.Generator | None = None,
    keep_logits: bool = False,
) -> JacobiCodes:
    """Codes of every image position after `decoder.prefill`.

    first_logits (B, V): the prefill's logits of code 0; `logits_of(inputs (B, L))` runs
    `decoder.window` (and guidance) -> (B, L, V); `target(logits)` -> the probabilities to
    sample from (temperature and filtering applied); `draw(probs (..., V))` -> ids (...), one
    draw per row from `generator`, which also draws the uniform guesses and the verdicts."""
    B, V = first_logits.shape
    N, T = decoder.config.image_seq_len, decoder.config.text_seq_len
    device = first_logits.device
    codes = torch.zeros(B, N, dtype=torch.long, device=device)
    kept = torch.empty(B, N, V, device=device) if keep_logits else None
    codes[:, 0] = draw(target(first_logits))
    if kept is not None:
        kept[:, 0] = first_logits
    guesses = torch.empty(B, 0, dtype=torch.long, device=device)
    q = torch.empty(B, 0, V, device=device)  # the distribution each guess was drawn from
    done, forwards = 1, 0
    while done < N:
        L = min(window, N - done)
        fresh = L - guesses.shape[1]
        if fresh > 0:  # positions new to the window: uniform guesses
            new = torch.randint(0, V, (B, fresh), generator=generator, device=device)
            guesses = torch.cat([guesses, new], 1)
            q = torch.cat([q, torch.full((B, fresh, V), 1.0 / V, device=device)], 1)
        guesses, q = guesses[:, :L], q[:, :L]
        logits = logits_of(torch.cat([codes[:, done - 1 : done], guesses[:, : L - 1]], 1))
        forwards += 1
        p = target(logits)  # (B, L, V)
        p_guess = p.gather(-1, guesses[..., None])[..., 0]
        q_guess = q.gather(-1, guesses[..., None])[..., 0]
        u = torch.rand((B, L), generator=generator, device=device)
        accepted = (u * q_guess < p_guess).long().cumprod(1).sum(1)  # (B,) leading keeps
        k = int(accepted.min())
        settled = min(k + 1, L)  # every row has settled this many codes
        # a row's codes: its leading kept guesses; at its first refusal a draw from
        # max(0, p - q); after that, the Jacobi update's guesses from this forward's p
        ahead = torch.arange(settled, L, device=device)  # positions after the settled ones
        outcome = guesses.clone()
        outcome[:, settled:] = torch.where(
            ahead > accepted[:, None], draw(p[:, settled:]), guesses[:, settled:]
        )
        first = accepted.clamp(max=L - 1)[:, None]  # (B, 1) each row's first refusal
        p_first, q_first = (d.gather(1, first[..., None].expand(B, 1, V))[:, 0] for d in (p, q))
        residual = (p_first - q_first).clamp_min(0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_first)
        refused = (accepted < L)[:, None]
        outcome.scatter_(
            1, first, torch.where(refused, draw(residual)[:, None], outcome.gather(1, first))
        )
        codes[:, done : done + settled] = outcome[:, :settled]
        if kept is not None:
            kept[:, done : done + settled] = logits[:, :settled]
        # the rest are the next window's guesses, each drawn from this forward's p (a row's
        # own settled codes too: p(x) / q(x) is 1 next time, so they are kept)
        guesses, q = outcome[:, settled:], p[:, settled:]
        done += settled
        decoder.cache.length = T + done  # slots whose inputs are settled codes
    return JacobiCodes(codes, kept, forwards)
