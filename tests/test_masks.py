"""Attention masks of the prior against brute-force definitions (paper sec. B.1, Fig. 11)."""

from __future__ import annotations

import pytest
import torch

from dalle_lightning.models.masks import attention_mask, first_key, image_mask, layer_patterns

GRID, TEXT = 5, 3


def brute_force(pattern: str, p: int, s: int, grid: int, kernel: int = 3) -> bool:
    """Does image slot p see image slot s? Straight from the rules, one pair at a time."""
    if s > p:
        return False  # nothing ever sees the future
    rp, cp, rs, cs = p // grid, p % grid, s // grid, s % grid
    if pattern == "full":
        return True
    if pattern == "row":
        return p - s <= grid  # the current slot and the `grid` before it
    if pattern == "column":
        # transposed image: column-major distance of at most `grid`
        return 0 <= (cp * grid + rp) - (cs * grid + rs) <= grid
    if pattern == "conv":
        col_dist = min(abs(cp - cs), grid - abs(cp - cs))
        return rp - rs <= kernel // 2 and col_dist <= kernel // 2
    raise AssertionError(pattern)


@pytest.mark.parametrize("pattern", ["full", "row", "column", "conv"])
def test_image_masks_match_the_brute_force_rule(pattern):
    mask = image_mask(pattern, GRID, conv_kernel=3)
    n = GRID * GRID
    expected = torch.tensor(
        [[brute_force(pattern, p, s, GRID) for s in range(n)] for p in range(n)]
    )
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("pattern", ["full", "row", "column", "conv"])
@pytest.mark.parametrize("grid, kernel", [(4, 3), (6, 3), (6, 5), (8, 11)])
def test_first_key_bounds_the_allowed_keys_tightly_for_row_and_conv(pattern, grid, kernel):
    """A decoding step reads only cache slots [first_key, p] of row and conv layers."""
    mask = image_mask(pattern, grid, conv_kernel=kernel)
    for p in range(grid * grid):
        earliest = int(mask[p].nonzero().min())
        first = first_key(pattern, p, grid, kernel)
        assert mask[p, first : p + 1].sum() == mask[p].sum()  # nothing allowed is left out
        if pattern == "row":
            assert first == earliest
        elif pattern == "conv":  # the start of the window's top row
            assert first == earliest // grid * grid
        else:
            assert first == 0


@pytest.mark.parametrize("pattern", ["full", "row", "column", "conv"])
def test_text_is_causal_and_every_image_slot_sees_all_text(pattern):
    mask = attention_mask(pattern, TEXT, GRID, conv_kernel=3)
    assert mask.shape == (TEXT + GRID**2, TEXT + GRID**2)
    assert torch.equal(mask[:TEXT, :TEXT], torch.ones(TEXT, TEXT, dtype=torch.bool).tril())
    assert not mask[:TEXT, TEXT:].any()  # text never sees the image
    assert mask[TEXT:, :TEXT].all()
    assert mask.diagonal().all()  # every slot sees itself
    assert not mask.triu(1).any()  # causal overall


def test_conv_window_wraps_around_columns():
    grid = 8
    mask = image_mask("conv", grid, conv_kernel=3)
    p = 2 * grid + 0  # row 2, column 0
    assert mask[p, 1 * grid + grid - 1]  # row 1, last column: a neighbour across the edge
    assert not mask[p, 1 * grid + 2]  # row 1, column 2: two columns away
    assert not mask[p, 0 * grid + 0]  # two rows up


def test_row_mask_sees_the_slot_above_but_no_further():
    mask = image_mask("row", GRID)
    p = 3 * GRID + 2
    assert mask[p, p - GRID] and not mask[p, p - GRID - 1]


def test_sparse_schedule_is_the_papers():
    # layer i in [1, L-1]: column if (i - 2) % 4 == 0 else row; layer L: conv
    assert layer_patterns(8, "sparse") == [
        "row",
        "column",
        "row",
        "row",
        "row",
        "column",
        "row",
        "conv",
    ]
    assert layer_patterns(3, "full") == ["full"] * 3
    with pytest.raises(ValueError, match="unknown"):
        layer_patterns(3, "dense")
