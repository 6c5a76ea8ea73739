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

Each row of a batch moves at its own pace: its window starts after the codes it has settled
(`KVDecoder.window` takes a start slot per row), and what it did not settle of this window
(this forward's draws, so q = p) moves to the front of its next one. A row that is done, or
near the end, still runs in the batch's forward, its positions past the image unused. Each
row is an exact draw.
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
    logits_of: Callable[[Tensor, Tensor | int], Tensor],
    target: Callable[[Tensor], Tensor],
    draw: Callable[[Tensor], Tensor],
    window: int,
    generator: torch.Generator | None = None,
    keep_logits: bool = False,
) -> JacobiCodes:
    """Codes of every image position after `decoder.prefill`.

    first_logits (B, V): the prefill's logits of code 0; `logits_of(inputs (B, L), starts)`
    runs `decoder.window(inputs, starts)` (and guidance) -> (B, L, V), starts (B,) or one int
    while the rows are level; `target(logits)` -> the probabilities to sample from
    (temperature and filtering applied); `draw(probs (..., V))` -> ids (...), one draw per row
    from `generator`, which also draws the uniform guesses and the verdicts."""
    B, V = first_logits.shape
    N, T = decoder.config.image_seq_len, decoder.config.text_seq_len
    device = first_logits.device
    # past position N: room for the window positions of rows near the end or done
    codes = torch.zeros(B, N + window, dtype=torch.long, device=device)
    kept = torch.empty(B, N + window, V, device=device) if keep_logits else None
    codes[:, 0] = draw(target(first_logits))
    if kept is not None:
        kept[:, 0] = first_logits
    positions = torch.arange(window, device=device)
    guesses = torch.randint(0, V, (B, window), generator=generator, device=device)
    q = torch.full((B, window, V), 1.0 / V, device=device)  # each guess was drawn from this
    done = torch.ones(B, dtype=torch.long, device=device)  # codes settled, per row
    forwards = 0
    while (least := int(done.min())) < N:
        L = min(window, N - least)
        inside = (N - done).clamp(max=L)[:, None]  # (B, 1) window positions inside the image
        # one start for all rows while they are level (the decoder's cheaper path)
        starts = T + least if least == int(done.max()) else T + done
        logits = logits_of(
            torch.cat([codes.gather(1, done[:, None] - 1), guesses[:, : L - 1]], 1), starts
        )
        forwards += 1
        p, guess, q_l, at = target(logits), guesses[:, :L], q[:, :L], positions[:L]  # p (B, L, V)
        p_guess = p.gather(-1, guess[..., None])[..., 0]
        q_guess = q_l.gather(-1, guess[..., None])[..., 0]
        u = torch.rand((B, L), generator=generator, device=device)
        keeps = (u * q_guess < p_guess).long().cumprod(1).sum(1, keepdim=True).minimum(inside)
        # a row's outcome: its leading kept guesses; at its first refusal a draw from
        # max(0, p - q); after that, the Jacobi update's draws from this forward's p
        outcome = torch.where(at > keeps, draw(p), guess)
        first = keeps.clamp(max=L - 1)  # (B, 1) each row's first refusal
        p_first, q_first = (d.gather(1, first[..., None].expand(B, 1, V))[:, 0] for d in (p, q_l))
        residual = (p_first - q_first).clamp_min(0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_first)
        outcome.scatter_(
            1, first, torch.where(keeps < inside, draw(residual)[:, None], outcome.gather(1, first))
        )
        settled = (keeps + 1).minimum(inside)  # (B, 1)
        # the whole window is written; past a row's settled codes it is overwritten later
        slots = done[:, None] + at
        codes.scatter_(1, slots, outcome)
        if kept is not None:
            kept.scatter_(1, slots[..., None].expand(-1, -1, V), logits)
        # each row's next window: what it did not settle of this one (drawn from this
        # forward's p, so q = p) at its front, then uniform guesses
        moved = settled + positions  # (B, W) this window's position of each next guess
        carried, source = moved < L, moved.clamp(max=L - 1)
        fresh = torch.randint(0, V, (B, window), generator=generator, device=device)
        guesses = torch.where(carried, outcome.gather(1, source), fresh)
        q = torch.where(
            carried[..., None], p.gather(1, source[..., None].expand(-1, -1, V)), 1.0 / V
        )
        done += settled[:, 0]
    decoder.cache.length = T + N
    return JacobiCodes(codes[:, :N], None if kept is None else kept[:, :N], forwards)
