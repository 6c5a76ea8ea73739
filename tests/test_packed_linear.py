"""Prepacked linears of the decoding step: same outputs as F.linear (+ GELU), autograd safe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dalle_lightning.sampling.packed_linear import PackedLinear


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_packed_equals_linear_for_any_row_count(gelu, rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    with torch.inference_mode():
        packed = PackedLinear(linear, rows=8, gelu=gelu)  # packed for 8 rows, used with others
        if torch.backends.mkldnn.is_available():
            assert packed.packed is not None  # the fast path is the one under test here
        x = torch.randn(rows, 64)
        expected = F.linear(x, linear.weight, linear.bias)
        expected = F.gelu(expected) if gelu else expected
        torch.testing.assert_close(packed(x), expected, atol=1e-5, rtol=0)


def test_with_autograd_on_it_is_the_differentiable_linear():
    linear = torch.nn.Linear(16, 8)
    packed = PackedLinear(linear, rows=4, gelu=True)
    assert packed.packed is None
    out = packed(torch.randn(4, 16))
    out.sum().backward()
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0


def test_packing_is_a_copy_taken_when_packed():
    linear = torch.nn.Linear(16, 8)
    x = torch.randn(2, 16)
    with torch.inference_mode():
        packed = PackedLinear(linear, rows=2)
        before = packed(x)
        linear.weight.add_(1.0)
        if packed.packed is not None:  # oneDNN's copy: the old weights until packed again
            torch.testing.assert_close(packed(x), before)
        torch.testing.assert_close(PackedLinear(linear, rows=2)(x), linear(x), atol=1e-5, rtol=0)
