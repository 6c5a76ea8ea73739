"""Linear layers with their weights prepacked for a decoding step's few rows.

A decoding step multiplies a handful of rows (the batch) by every weight matrix of the prior,
so on CPU the products are dominated by reading and rearranging the weights, not by the
arithmetic. oneDNN can reorder a weight once into its own blocked layout (what torch.compile
does to frozen CPU weights), which makes these products faster (docs/speed.md); GELU is fused
into the first MLP layer. Elsewhere (GPU, no oneDNN, not fp32, autograd on, inputs not fp32
as under autocast) `PackedLinear` is plain `F.linear` (+ `F.gelu`).

The packed weights are a copy taken at packing time: pack again after the weights change
(`KVDecoder` packs once per generated batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def can_prepack(weight: Tensor) -> bool:
    """oneDNN's prepacked fp32 linear applies: CPU tensors, no autograd, ops present."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear:
    """`linear(x)` (then exact GELU with gelu=True) for inputs of `rows` rows."""

    def __init__(self, linear: nn.Linear, rows: int, gelu: bool = False):
        self.weight, self.bias, self.gelu = linear.weight, linear.bias, gelu
        self.packed = None
        if can_prepack(linear.weight):
            try:  # a private op (torch.compile's own): fall back if a release changes it
                self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)
            except RuntimeError:
                self.packed = None

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is not None and x.dtype == torch.float32 and not torch.is_grad_enabled():
            attr = "gelu" if self.gelu else "none"
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, attr, [], "none")
        out = F.linear(x, self.weight, self.bias)
        return F.gelu(out) if self.gelu else out
