"""Attention masks of the prior (Ramesh et al., 2021, sec. B.1, Fig. 11).

The sequence is `[text slots (T) | image slots (N = h * w)]`. Image slot p holds the
start-of-image token (p = 0) or image code p - 1, and predicts image code p; its grid
coordinates are those of code p: row p // w, column p % w.

Rules, as boolean masks `allowed[query, key]` (True: may attend), for
`torch.nn.functional.scaled_dot_product_attention` and FlexAttention:
- text attends causally to text, in every layer;
- every image slot attends to all text;
- image to image, by pattern:
    full    causal: s <= p;
    row     the current slot and the w before it (the previous w + 1 image codes): 0 <= p - s <= w;
    column  the same on the transposed image, kept causal in raster order: s <= p and
            0 <= cm(p) - cm(s) <= h, with cm(x) = (x % w) * h + x // w the column-major index;
    conv    a causal k x k window with wraparound: s <= p, row distance <= k // 2 and
            column distance <= k // 2 measured around the image (c and w - 1 are neighbours).
- `sparse` schedule over layers i = 1..L: layer L is conv; layer i < L is column if
  (i - 2) % 4 == 0, else row.
"""

from __future__ import annotations

import torch
from torch import Tensor

PATTERNS = ("full", "row", "column", "conv")
SCHEDULES = ("full", "sparse")


def layer_patterns(depth: int, schedule: str) -> list[str]:
    """The mask pattern of each of `depth` layers."""
    if schedule == "full":
        return ["full"] * depth
    if schedule != "sparse":
        raise ValueError(f"attention schedule {schedule!r} unknown; one of {SCHEDULES}")
    patterns = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, depth)]
    return patterns + ["conv"]


def image_mask(pattern: str, grid: int, conv_kernel: int = 11, device=None) -> Tensor:
    """(N, N) bool over image slots, N = grid * grid."""
    n = grid * grid
    p = torch.arange(n, device=device).view(n, 1)  # query slot
    s = torch.arange(n, device=device).view(1, n)  # key slot
    causal = s <= p
    if pattern == "full":
        return causal
    if pattern == "row":
        return (p - s >= 0) & (p - s <= grid)
    if pattern == "column":
        cm_p, cm_s = (p % grid) * grid + p // grid, (s % grid) * grid + s // grid
        return causal & (cm_p - cm_s >= 0) & (cm_p - cm_s <= grid)
    if pattern == "conv":
        half = conv_kernel // 2
        col_dist = (p % grid - s % grid).abs()
        col_dist = torch.minimum(col_dist, grid - col_dist)  # wraparound
        return causal & (p // grid - s // grid <= half) & (col_dist <= half)
    raise ValueError(f"attention pattern {pattern!r} unknown; one of {PATTERNS}")


def first_key(pattern: str, slot: int, grid: int, conv_kernel: int = 11) -> int:
    """A lower bound on the image slots that image slot `slot` may attend to under `pattern`:
    every allowed key lies in [first_key, slot]. Row: the earliest allowed slot; conv: the start
    of the window's top row; full and column: 0. Lets a decoding step read only that part of
    the key/value cache."""
    if pattern == "row":
        return max(0, slot - grid)
    if pattern == "conv":
        return max(0, (slot // grid - conv_kernel // 2) * grid)
    if pattern in ("full", "column"):
        return 0
    raise ValueError(f"attention pattern {pattern!r} unknown; one of {PATTERNS}")


def attention_mask(
    pattern: str, text_len: int, grid: int, conv_kernel: int = 11, device=None
) -> Tensor:
    """(T + N, T + N) bool: text causal, image sees all text, image-image by `pattern`."""
    T, N = text_len, grid * grid
    mask = torch.zeros(T + N, T + N, dtype=torch.bool, device=device)
    mask[:T, :T] = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    mask[T:, :T] = True
    mask[T:, T:] = image_mask(pattern, grid, conv_kernel, device)
    return mask


def flex_block_mask(mask: Tensor):
    """The same rule as a FlexAttention BlockMask (blocks with nothing allowed are skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(batch, head, q_idx, kv_idx):
        return mask[q_idx, kv_idx]

    size = mask.shape[0]
    return create_block_mask(mask_mod, None, None, size, size, device=mask.device)
