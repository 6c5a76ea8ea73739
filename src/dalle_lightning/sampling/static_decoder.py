"""A decoding step with the same shapes at every image slot, for CUDA graphs: the prior's
cached step the way gpt-fast decodes (a preallocated cache held as module buffers, the slot
as a tensor, attention over the whole cache under the mask's row), which
`torch.compile(mode="reduce-overhead")` captures once and replays for every slot.

`StaticDecoder(prior, batch)` is built once and reused for every batch of that size (its
cache is rewritten by each prompt); `prefill(text)` is the KV decoder's prefill into its buffers,
`step(code, slot)` one slot. On CPU the step is slower than `KVDecoder.step` eager (which
reads only the filled part of the cache) and about as fast compiled
by Inductor (`python -m dalle_lightning.benchmark --decoder static-compiled`: docs/speed.md);
it is the GPU path, run by `python -m dalle_lightning.gpu_check`.
`tests/test_static_decoder.py` checks it against `KVDecoder` (1e-5), that it compiles into one
graph for all slots, and that Inductor's code writes one slot of the cache per step.

Shape legend: B batch, T text_seq_len, S = T + N slots, D dim, H heads, E head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_lightning.models.fp32 import in_fp32
from dalle_lightning.models.transformer import PriorTransformer
from dalle_lightning.sampling.kv_decoder import KVCache, additive_masks, prefill


class StaticDecoder(nn.Module):
    def __init__(self, prior: PriorTransformer, batch: int):
        super().__init__()
        c, weight = prior.config, prior.text_embedding.weight
        self.prior = prior
        # the KV decoder's cache, each layer's tensor a buffer here so that CUDA graphs see
        # static addresses; `prefill` writes it, `step` one slot of each layer in place
        self.cache = KVCache(c, batch, weight.device, weight.dtype)
        for layer, keys_values in enumerate(self.cache.layers):
            self.register_buffer(f"keys_values_{layer}", keys_values)
        # slot positions (S, D): zeros over the text, row + column embeddings over the image
        with torch.no_grad():
            positions = F.pad(prior.image_positions(), (0, 0, c.text_seq_len, 0))
        self.register_buffer("positions", positions)
        for pattern, bias in additive_masks(prior).items():
            self.register_buffer(f"bias_{pattern}", bias)

        self.step_fn = self.step  # what sampling calls: `compile()` swaps in the compiled one

    def compile(self, mode: str | None = "reduce-overhead") -> StaticDecoder:
        """Compile `step` once (one graph for every slot; CUDA graphs with reduce-overhead)."""
        self.step_fn = torch.compile(self.step, mode=mode, fullgraph=True)
        return self

    def prefill(self, text: Tensor) -> Tensor:
        """The KV decoder's prefill into this decoder's cache: logits of code 0 (B, V)."""
        return prefill(self.prior, self.cache, text)

    def step(self, code: Tensor, slot: Tensor) -> Tensor:
        """Feed code (B,) into `slot` (a 0-d long tensor: T + image position); logits of the
        next code (B, V). Slots after `slot` hold stale keys and values, masked out."""
        prior, c = self.prior, self.prior.config
        B, D, H, E = code.shape[0], c.dim, c.heads, c.dim // c.heads
        at = slot.view(1)
        x = F.embedding(code, prior.image_embedding.weight) + self.positions.index_select(0, at)
        for layer, (block, pattern) in enumerate(zip(prior.blocks, prior.patterns, strict=True)):
            attention = block.attention
            h = F.layer_norm(x, (D,), block.norm_1.weight, block.norm_1.bias)
            qkv = F.linear(h, attention.qkv.weight, attention.qkv.bias).view(B, 3, H, E)
            keys_values = getattr(self, f"keys_values_{layer}")  # (2, B, H, S, E)
            # in place on the buffer itself (on a view of one buffer for all layers, Inductor
            # copied the whole cache in every layer: tests/test_static_decoder.py)
            keys_values.index_copy_(3, at, qkv[:, 1:].transpose(0, 1)[..., None, :])
            keys, values = keys_values.unbind(0)  # (B, H, S, E)
            mask = getattr(self, f"bias_{pattern}").index_select(0, at)  # (1, S)
            out = F.scaled_dot_product_attention(qkv[:, 0, :, None], keys, values, attn_mask=mask)
            x = x + F.linear(out.view(B, D), attention.proj.weight, attention.proj.bias)
            h = F.layer_norm(x, (D,), block.norm_2.weight, block.norm_2.bias)
            hidden = F.gelu(F.linear(h, block.mlp[0].weight, block.mlp[0].bias))
            x = x + F.linear(hidden, block.mlp[2].weight, block.mlp[2].bias)
        return in_fp32(
            prior.to_image_logits, F.layer_norm(x, (D,), prior.norm.weight, prior.norm.bias)
        )
