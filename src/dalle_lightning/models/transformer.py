"""The prior: a decoder-only transformer over `[text tokens | image tokens]` (Ramesh et al.,
2021, sec. 2.2 and B.1), plain PyTorch.

Inputs: text ids (B, T) from `text/tokenizer.py` (per-position pad ids included) and image
codes (B, N) from the dVAE (N = h * w, raster order). The sequence is
    text slots:  text embedding + text position embedding
    image slots: [start-of-image, code_0, ..., code_{N-2}] embeddings + row + column embedding
so image slot p predicts code p (see `masks.py`). Pre-LayerNorm blocks; the layers' masks
follow `attention` (`full` or the paper's `sparse` row/column/conv schedule). Text slots
predict only text ids, image slots only image ids (two output heads).

Generation runs the prompt once, then one image slot per step against a preallocated
key/value cache (`KVCache`); `tests/test_transformer.py` checks that cached and uncached
logits are equal.

Shape legend: B batch, T text_seq_len, N image tokens, S = T + N, D dim, H heads, E head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_lightning.config import require, require_choice, require_float, require_int
from dalle_lightning.models.fp32 import in_fp32
from dalle_lightning.models.masks import (
    SCHEDULES,
    attention_mask,
    first_key,
    flex_block_mask,
    layer_patterns,
)
from dalle_lightning.models.packed_linear import PackedLinear

BACKENDS = ("sdpa", "flex")


@dataclass(frozen=True)
class PriorConfig:
    """Sizes of the prior. Paper: dim 3968 (62 heads x 64), depth 64, T 256, vocab 16384,
    32 x 32 image tokens from 8192 codes. `image_vocab` and `grid_size` come from the dVAE."""

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


class KVCache:
    """Preallocated keys and values of every layer: (depth, B, H, S, E) each, two views of one
    (depth, 2, B, H, S, E) buffer so that a decoding step writes both with one copy."""

    def __init__(self, config: PriorConfig, batch: int, device=None, dtype=None):
        head_dim = config.dim // config.heads
        shape = (config.depth, 2, batch, config.heads, config.seq_len, head_dim)
        self.keys_values = torch.zeros(shape, device=device, dtype=dtype)
        self.keys, self.values = self.keys_values.unbind(1)
        self.length = 0  # slots filled so far
        # set by `PriorTransformer.prefill` for `step`: (N, D) row + column embeddings, and each
        # block's (qkv, proj, mlp in + GELU, mlp out) linears plus the image head, prepacked
        self.image_positions: Tensor | None = None
        self.linears: list[tuple[PackedLinear, ...]] = []
        self.image_head: PackedLinear | None = None


class Attention(nn.Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)

    def forward(
        self, x: Tensor, mask: Tensor, block_mask=None, cache: KVCache | None = None, layer=0
    ) -> Tensor:
        """x (B, t, D) at slots [start, start + t), start = cache.length (0 without cache)."""
        B, t, D = x.shape
        q, k, v = self.qkv(x).view(B, t, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        start = 0
        if cache is not None:
            start = cache.length
            cache.keys[layer, :, :, start : start + t] = k
            cache.values[layer, :, :, start : start + t] = v
            k = cache.keys[layer, :, :, : start + t]
            v = cache.values[layer, :, :, : start + t]
        if block_mask is not None:
            from torch.nn.attention.flex_attention import flex_attention

            out = flex_attention(q, k, v, block_mask=block_mask)
        else:
            allowed = mask[start : start + t, : start + t]  # rows of the new slots
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
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

    def forward(self, x: Tensor, mask: Tensor, block_mask=None, cache=None, layer=0) -> Tensor:
        x = x + self.dropout(self.attention(self.norm_1(x), mask, block_mask, cache, layer))
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
        self._derived_masks: dict = {}  # FlexAttention block masks, additive step biases
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
    def _mask(self, pattern: str) -> Tensor:
        return getattr(self, f"mask_{pattern}")

    def _block_mask(self, pattern: str):
        mask = self._mask(pattern)
        key = (pattern, mask.device)
        if key not in self._derived_masks:
            self._derived_masks[key] = flex_block_mask(mask)
        return self._derived_masks[key]

    def hidden(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """(B, t, D) embeddings of slots [start, start + t) -> final normed states (B, t, D)."""
        use_flex = self.config.backend == "flex" and cache is None
        for layer, (block, pattern) in enumerate(zip(self.blocks, self.patterns, strict=True)):
            block_mask = self._block_mask(pattern) if use_flex else None
            x = block(x, self._mask(pattern), block_mask, cache, layer)
        if cache is not None:
            cache.length += x.shape[1]
        return self.norm(x)

    def forward(self, text: Tensor, codes: Tensor) -> PriorOutput:
        """Teacher-forced logits for text (B, T) and codes (B, N)."""
        T = self.config.text_seq_len
        x = torch.cat([self.embed_text(text), self.embed_image(self.image_inputs(codes), 0)], 1)
        h = self.hidden(x)
        return PriorOutput(
            in_fp32(self.to_text_logits, h[:, :T]), in_fp32(self.to_image_logits, h[:, T:])
        )

    # generation with a key/value cache -----------------------------------------------------
    def new_cache(self, batch: int) -> KVCache:
        weight = self.text_embedding.weight
        return KVCache(self.config, batch, weight.device, weight.dtype)

    def prefill(self, text: Tensor, cache: KVCache) -> Tensor:
        """Run the text and the start-of-image slot; logits of code 0: (B, image_vocab)."""
        rows = text.shape[0]  # what every `step` reads: positions and prepacked weights
        cache.image_positions = self.image_positions()
        cache.linears = [
            (
                PackedLinear(block.attention.qkv, rows),
                PackedLinear(block.attention.proj, rows),
                PackedLinear(block.mlp[0], rows, gelu=True),
                PackedLinear(block.mlp[2], rows),
            )
            for block in self.blocks
        ]
        cache.image_head = PackedLinear(self.to_image_logits, rows)
        soi = torch.full_like(text[:, :1], self.start_of_image)
        x = torch.cat([self.embed_text(text), self.embed_image(soi, 0)], dim=1)
        return in_fp32(self.to_image_logits, self.hidden(x, cache)[:, -1])

    def step(self, code: Tensor, cache: KVCache) -> Tensor:
        """Feed code p - 1 (B,) into image slot p; logits of code p: (B, image_vocab).

        The same math as `hidden` for one slot, written with functional calls: a decoding step
        is a few small matmuls, and the module calls, the mask lookups and the separate
        scale/mask/matmul ops cost about a fifth of it on CPU. The linears use the weights that
        `prefill` prepacked (`packed_linear.py`, GELU fused) and the position embeddings it
        summed; scale, mask and scores are one `baddbmm` with an additive mask row, and row and
        conv layers read only their window of the cache (`_step_attention`). No dropout:
        generation runs in eval mode. Equal to the teacher-forced logits
        (`tests/test_transformer.py`).
        """
        c = self.config
        B, T, D, H, E = code.shape[0], c.text_seq_len, c.dim, c.heads, c.dim // c.heads
        start = cache.length
        x = F.embedding(code, self.image_embedding.weight) + cache.image_positions[start - T]
        layers = zip(self.blocks, self.patterns, cache.linears, strict=True)
        for layer, (block, pattern, (qkv_in, proj, mlp_in, mlp_out)) in enumerate(layers):
            h = F.layer_norm(x, (D,), block.norm_1.weight, block.norm_1.bias)
            qkv = qkv_in(h).view(B, 3, H, E)
            cache.keys_values[layer, :, :, :, start] = qkv[:, 1:].transpose(0, 1)
            out = self._step_attention(qkv[:, 0].reshape(B * H, 1, E), cache, layer, pattern)
            x = x + proj(out.view(B, D))
            x = x + mlp_out(mlp_in(F.layer_norm(x, (D,), block.norm_2.weight, block.norm_2.bias)))
        cache.length += 1
        return in_fp32(cache.image_head, F.layer_norm(x, (D,), self.norm.weight, self.norm.bias))

    def _step_attention(self, q: Tensor, cache: KVCache, layer: int, pattern: str) -> Tensor:
        """Queries (B * H, 1, E) of slot `cache.length` against the cached keys and values that
        slot may see: (B * H, 1, E). Row and conv layers read only the text and the window
        [first_key, slot] of the cache, under one softmax."""
        c = self.config
        T, (BH, _, E), start = c.text_seq_len, q.shape, cache.length
        bias = self._step_bias(pattern, q.dtype)[start]
        lo = T + first_key(pattern, start - T, c.grid_size, c.conv_kernel)

        def cached(buffer: Tensor, a: int, b: int) -> Tensor:  # slots [a, b): (B * H, b - a, E)
            return buffer[layer, :, :, a:b].reshape(BH, b - a, E)

        if lo == T:  # one product over [text | image slots so far]
            keys = cached(cache.keys, 0, start + 1).transpose(1, 2)
            scores = torch.baddbmm(bias[: start + 1], q, keys, alpha=E**-0.5)
            return torch.bmm(scores.softmax(-1), cached(cache.values, 0, start + 1))
        text_scores = torch.bmm(q, cached(cache.keys, 0, T).transpose(1, 2))
        window_keys = cached(cache.keys, lo, start + 1).transpose(1, 2)
        window_scores = torch.baddbmm(bias[lo : start + 1], q, window_keys)
        probs = torch.cat([text_scores, window_scores], -1).mul_(E**-0.5).softmax(-1)
        text_part = torch.bmm(probs[..., :T], cached(cache.values, 0, T))
        return torch.baddbmm(text_part, probs[..., T:], cached(cache.values, lo, start + 1))

    def _step_bias(self, pattern: str, dtype: torch.dtype) -> Tensor:
        """The mask as an additive (S, S) bias: 0 where allowed, -inf elsewhere (cached)."""
        mask = self._mask(pattern)
        key = ("bias", pattern, mask.device, dtype)
        if key not in self._derived_masks:
            bias = torch.zeros(mask.shape, device=mask.device, dtype=dtype)
            self._derived_masks[key] = bias.masked_fill_(~mask, float("-inf"))
        return self._derived_masks[key]
