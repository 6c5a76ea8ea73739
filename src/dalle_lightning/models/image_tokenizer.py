"""What the prior, the token cache and generation need from an image tokenizer.

The dVAE (`dvae.py`) is one; any nn.Module with these members (a VQGAN, the official OpenAI dVAE
after `convert_openai.py`) can stand in for it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class ImageTokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...  # number of codes

    @property
    def grid_size(self) -> int: ...  # codes per image side

    def encode(self, images: Tensor) -> Tensor: ...  # (B, C, H, W) in [0, 1] -> (B, h, w) long

    def decode(self, codes: Tensor) -> Tensor: ...  # (B, h, w) long -> (B, C, H, W) in [0, 1]
