"""The paper's fp32 islands under mixed precision (Ramesh et al., 2021, sec. 2.4, A.3).

Under 16-mixed (autocast), a few layers whose outputs are large softmaxes or carry the whole
image signal run in fp32 instead: the dVAE encoder's final logits conv (K-way code logits),
the dVAE decoder's first conv (it reads the K-way relaxed codes), and the prior's two output
heads (text and image logits). Parameters themselves stay fp32 under mixed precision (autocast
casts per op), so embeddings, norm gains and biases are fp32 already.

`in_fp32(module, x)` runs one such layer; outside autocast it is the plain call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def in_fp32(layer: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """`layer(x)` with autocast off and `x` in fp32 when autocast is on; else `layer(x)`."""
    device = x.device.type
    # Dynamo traces `is_autocast_enabled`, but in torch 2.11 (not 2.14) not
    # `is_autocast_available`: a graph break, which `torch.compile(fullgraph=True)` of the
    # static decoding step refuses. Under compilation the device is one autocast knows.
    available = torch.compiler.is_compiling() or torch.amp.is_autocast_available(device)
    if not (available and torch.is_autocast_enabled(device)):
        return layer(x)
    with torch.autocast(device, enabled=False):
        return layer(x.float())
