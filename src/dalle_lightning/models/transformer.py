"""The prior: a decoder-only transformer over `[text tokens | image tokens]` (Ramesh et al.,
2021, sec. 2.2 and B.1), plain PyTorch with one forward.

Inputs: text ids (B, T) from `text/tokenizer.py` (per-position pad ids included) and image
codes (B, N) from the dVAE (N = h * w, raster order). The sequence is
    text slots:  text embedding + text position embedding
    image slots: [start-of-image, code_0, ..., code_{N-2}] embeddings + row + column embedding
so image slot p predicts code p (see `masks.py`). Pre-LayerNorm blocks; the layers' masks
follow `attention` (`full` or the paper's `sparse` row/column/conv schedule). Text slots
predict only text ids, image slots only image ids (two output heads).

Generation (`sampling/kv_decoder.py`) runs this forward once over the prompt, then one image
slot per step against a key/value cache; `tests/test_transformer.py` checks that both give
the teacher-forced logits.

Shape legend: B batch, T text_seq_len, N image tokens, S = T + N, D dim, H heads, E head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_lightning.config import require, require_choice, require_float, require_int
from dalle_lightning.models.fp32 import in_fp32
from dalle_lightning.models.masks import (
    SCHEDULES,
    attention_mask,
    flex_block_mask,
    layer_patterns,
)

BACKENDS = ("sdpa", "flex")


@dataclass(frozen=True)
class PriorConfig:
    """Sizes of the prior. Paper: dim 3968 (62 heads x 64), depth 64, T 256, vocab 16384,
    32 x 32 image tokens from 8192 codes. conf/model/dalle.yaml's `net` sets the rest."""

    DERIVED: ClassVar[str] = (
        "image_vocab and grid_size come from the dVAE checkpoint, text_vocab and text_seq_len "
        "from model.text"
    )

    text_vocab: int = 512  # BPE ids; the embedding also holds text_seq_len pad ids
    text_seq_len: int = 32
    image_vocab: int = 512
    grid_size: int = 16
    dim: int = 256
    depth: int = 4
    heads: int = 8
    mlp_ratio: int = 4
    dropout: float = 0.0
    attention: str = "sparse"  # full | sparse (paper: row/column layers, conv last)
    conv_kernel: int = 11
    backend: str = "sdpa"  # sdpa (boolean masks) | flex (FlexAttention block masks)

    def __post_init__(self) -> None:
        for name in ("text_vocab", "text_seq_len", "image_vocab", "grid_size", "depth", "heads"):
            require_int(name, getattr(self, name), 1)
        require_int("dim", self.dim, 1)
        require(
            self.dim % self.heads == 0,
            "dim",
            self.dim,
            f"a multiple of heads={self.heads} (head dim = dim / heads)",
        )
        require_int("mlp_ratio", self.mlp_ratio, 1)
        require_float("dropout", self.dropout, 0.0, 1.0)
        require_choice("attention", self.attention, SCHEDULES)
        require_int("conv_kernel", self.conv_kernel, 1)
        require(self.conv_kernel % 2 == 1, "conv_kernel", self.conv_kernel, "an odd integer (11)")
        require_choice("backend", self.backend, BACKENDS)

    @property
    def image_seq_len(self) -> int:
        return self.grid_size**2

    @property
    def seq_len(self) -> int:
        return self.text_seq_len + self.image_seq_len


class PriorOutput(NamedTuple):
    text_logits: Tensor  # (B, T, text_vocab + T): slot j predicts text id j + 1
    image_logits: Tensor  # (B, N, image_vocab): slot p predicts code p


class Attention(nn.Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)

    def forward(self, x: Tensor, mask: Tensor, block_mask=None) -> Tensor:
        """x (B, t, D) at slots [0, t) -> (B, t, D); `mask` (S, S) allowed[query, key]."""
        B, t, D = x.shape
        # (B, t, 3 * D) -> q, k, v (B, H, t, E); sampling/kv_decoder.py reads k, v in this layout
        q, k, v = self.qkv(x).view(B, t, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if block_mask is not None:
            from torch.nn.attention.flex_attention import flex_attention

            out = flex_attention(q, k, v, block_mask=block_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:t, :t])
        return self.proj(out.transpose(1, 2).reshape(B, t, D))


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.norm_1 = nn.LayerNorm(config.dim)
        self.attention = Attention(config)
        self.norm_2 = nn.LayerNorm(config.dim)
        hidden = config.mlp_ratio * config.dim
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, hidden), nn.GELU(), nn.Linear(hidden, config.dim)
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, mask: Tensor, block_mask=None) -> Tensor:
        x = x + self.dropout(self.attention(self.norm_1(x), mask, block_mask))
        return x + self.dropout(self.mlp(self.norm_2(x)))


class PriorTransformer(nn.Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        c = config
        self.text_embedding = nn.Embedding(c.text_vocab + c.text_seq_len, c.dim)
        self.text_position = nn.Embedding(c.text_seq_len, c.dim)
        self.image_embedding = nn.Embedding(c.image_vocab + 1, c.dim)  # + start-of-image
        self.row_embedding = nn.Embedding(c.grid_size, c.dim)
        self.column_embedding = nn.Embedding(c.grid_size, c.dim)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)
        self.to_text_logits = nn.Linear(c.dim, c.text_vocab + c.text_seq_len)
        self.to_image_logits = nn.Linear(c.dim, c.image_vocab)
        self.patterns = layer_patterns(c.depth, c.attention)
        for pattern in set(self.patterns):  # not saved: rebuilt from the config
            mask = attention_mask(pattern, c.text_seq_len, c.grid_size, c.conv_kernel)
            self.register_buffer(f"mask_{pattern}", mask, persistent=False)
        self._block_masks: dict = {}  # FlexAttention block masks, built on first use
        self.reset_parameters()

    @property
    def start_of_image(self) -> int:
        return self.config.image_vocab

    def reset_parameters(self) -> None:
        """GPT-2 style: N(0, 0.02); residual output projections scaled by 1/sqrt(2 * depth)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        for block in self.blocks:
            for proj in (block.attention.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / (2 * self.config.depth) ** 0.5)

    # embeddings ----------------------------------------------------------------------------
    def embed_text(self, text: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, D)."""
        positions = torch.arange(text.shape[1], device=text.device)
        return self.text_embedding(text) + self.text_position(positions)

    def image_positions(self) -> Tensor:
        """(N, D): row embedding + column embedding of every image slot, in raster order."""
        grid = self.config.grid_size
        slots = torch.arange(grid * grid, device=self.row_embedding.weight.device)
        return self.row_embedding(slots // grid) + self.column_embedding(slots % grid)

    def embed_image(self, inputs: Tensor, start: int) -> Tensor:
        """(B, t) image-slot inputs (codes, or start_of_image) at slots start.. -> (B, t, D)."""
        positions = self.image_positions()[start : start + inputs.shape[1]]
        return self.image_embedding(inputs) + positions

    def image_inputs(self, codes: Tensor) -> Tensor:
        """(B, N) codes -> (B, N) slot inputs: start-of-image, then codes shifted by one."""
        soi = torch.full_like(codes[:, :1], self.start_of_image)
        return torch.cat([soi, codes[:, :-1]], dim=1)

    # the stack -----------------------------------------------------------------------------
    def mask(self, pattern: str) -> Tensor:
        """(S, S) bool allowed[query, key] of the layers with `pattern` (see `masks.py`)."""
        return getattr(self, f"mask_{pattern}")

    def _block_mask(self, pattern: str):
        mask = self.mask(pattern)
        key = (pattern, mask.device)
        if key not in self._block_masks:
            self._block_masks[key] = flex_block_mask(mask)
        return self._block_masks[key]

    def hidden(self, x: Tensor) -> Tensor:
        """(B, t, D) embeddings of slots [0, t) -> final normed states (B, t, D). The prompt
        of generation is t = T + 1 slots; FlexAttention's block masks need all S."""
        use_flex = self.config.backend == "flex" and x.shape[1] == self.config.seq_len
        for block, pattern in zip(self.blocks, self.patterns, strict=True):
            block_mask = self._block_mask(pattern) if use_flex else None
            x = block(x, self.mask(pattern), block_mask)
        return self.norm(x)

    def forward(self, text: Tensor, codes: Tensor) -> PriorOutput:
        """Teacher-forced logits for text (B, T) and codes (B, N)."""
        T = self.config.text_seq_len
        x = torch.cat([self.embed_text(text), self.embed_image(self.image_inputs(codes), 0)], 1)
        h = self.hidden(x)
        return PriorOutput(
            in_fp32(self.to_text_logits, h[:, :T]), in_fp32(self.to_image_logits, h[:, T:])
        )
