"""Best-of-k selection over one pool of candidates (Ramesh et al., 2021, sec. 2.3 and Fig. 9).

N = max(k) images are generated per caption once and scored by a reranker (CLIP); best-of-k
for every smaller k takes the best among the *first* k of the same pool, so the whole sweep
over rerank counts costs one generation of N, and best-of-k is nested: growing k can only
raise the chosen image's score.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from dalle_lightning.config import require


def best_of_k(scores: Tensor, counts: Sequence[int]) -> dict[int, Tensor]:
    """scores (C, N): candidate j of caption i -> {k: (C,) index in [0, k) of the best of the
    first k candidates} for every k in `counts` (1 <= k <= N)."""
    n = scores.shape[1]
    for k in counts:
        require(isinstance(k, int) and 1 <= k <= n, "rerank_counts", list(counts), f"in [1, {n}]")
    return {k: scores[:, :k].argmax(1) for k in counts}
