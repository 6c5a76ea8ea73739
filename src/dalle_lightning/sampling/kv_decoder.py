"""The prior's decoder for generation: the prompt once, then one image slot per step against a
key/value cache (Ramesh et al., 2021, sec. 2.3 samples image tokens one at a time).

`KVDecoder(prior, batch)` is built once per generated batch:
- `prefill(text)` runs the prior's own forward over `[text | start-of-image]` (T + 1 slots);
  forward hooks on each block's `qkv` layer copy that layer's keys and values into the cache.
  It returns the logits of code 0.
- `step(code)` feeds code p - 1 into image slot p and returns the logits of code p. It is the
  block's math for one slot written with functional calls: a decoding step is a few small
  matmuls, and module calls, mask lookups and separate scale/mask/matmul ops cost about a
  fifth of it on CPU. The linears are `F.linear`'s own `addmm` on transposed views of the
  prior's weights taken once (oneDNN's prepacked copies were slower on three of the four
  machines measured: docs/speed.md), the views of the cache each step reads are taken once,
  the position embeddings are summed once, scale, mask and scores are one `baddbmm` with an
  additive mask row, row and conv layers read only their window of the cache, and keys and
  values are written with one copy. No dropout: generation runs in eval mode.
`tests/test_transformer.py` checks prefill + steps against the teacher-forced forward
(atol 1e-5); `python -m dalle_lightning.benchmark --only generate` measures it.

Shape legend: B batch, T text_seq_len, N image tokens, S = T + N, D dim, H heads, E head dim.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_lightning.models.fp32 import in_fp32
from dalle_lightning.models.masks import first_key
from dalle_lightning.models.transformer import PriorConfig, PriorTransformer


class KVCache:
    """Preallocated keys and values: one (2, B, H, S, E) tensor per layer (`layers[i][0]` its
    keys, `[1]` its values), so that a decoding step writes both with one copy and a compiled
    step updates each layer's tensor in place (views of one buffer for all layers made
    Inductor copy the whole cache in every layer: docs/speed.md)."""

    def __init__(self, config: PriorConfig, batch: int, device=None, dtype=None, spare: int = 0):
        """`spare` slots past the sequence take the window positions of rows near its end
        (`KVDecoder.window`), whose outputs are not used."""
        head_dim = config.dim // config.heads
        shape = (2, batch, config.heads, config.seq_len + spare, head_dim)
        self.layers = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.depth)]
        self.length = 0  # slots filled so far


Affine = tuple[Tensor, Tensor | None]  # a linear layer's weight as an (in, out) view, its bias


def affine(layer: nn.Linear) -> Affine:
    return layer.weight.t(), layer.bias


def linear(layer: Affine, x: Tensor) -> Tensor:
    """`layer(x)` for 2-d x: the product `F.linear` runs, without the module call or the
    transpose per call (each op costs a decoding step time)."""
    weight_t, bias = layer
    return torch.addmm(bias, x, weight_t) if bias is not None else x @ weight_t


def additive_masks(prior: PriorTransformer) -> dict[str, Tensor]:
    """Each attention pattern's (S, S) mask as an additive bias: 0 where allowed, -inf not."""
    weight = prior.text_embedding.weight
    return {
        pattern: torch.zeros(
            prior.mask(pattern).shape, device=weight.device, dtype=weight.dtype
        ).masked_fill_(~prior.mask(pattern), float("-inf"))
        for pattern in set(prior.patterns)
    }


def prefill(prior: PriorTransformer, cache: KVCache, text: Tensor) -> Tensor:
    """Run the text (B, T) and the start-of-image slot with the prior's own forward, writing
    each layer's keys and values into `cache`; logits of code 0: (B, image_vocab).

    Rows with the same text (the k candidates of one caption in best-of-k, the blank rows of
    guidance) share one forward: the prompt runs once per distinct row and its keys, values
    and logits are copied to every row that has it."""
    H, E = prior.config.heads, prior.config.dim // prior.config.heads
    unique, rows = torch.unique(text, dim=0, return_inverse=True)
    if unique.shape[0] == text.shape[0]:  # nothing shared: keep the rows' own order
        unique, rows = text, None

    def keep(layer: int):
        def hook(module, inputs, qkv: Tensor) -> None:  # qkv (U, t, 3 * D)
            U, t, _ = qkv.shape
            keys_values = qkv.view(U, t, 3, H, E)[:, :, 1:].permute(2, 0, 3, 1, 4)
            if rows is not None:
                keys_values = keys_values.index_select(1, rows)
            cache.layers[layer][:, :, :, :t] = keys_values  # (2, B, H, t, E)

        return hook

    handles = [
        block.attention.qkv.register_forward_hook(keep(layer))
        for layer, block in enumerate(prior.blocks)
    ]
    try:
        soi = torch.full_like(unique[:, :1], prior.start_of_image)
        h = prior.hidden(torch.cat([prior.embed_text(unique), prior.embed_image(soi, 0)], 1))
    finally:
        for handle in handles:
            handle.remove()
    cache.length = h.shape[1]
    logits = in_fp32(prior.to_image_logits, h[:, -1])
    return logits if rows is None else logits.index_select(0, rows)


class KVDecoder:
    """Cached decoding of `batch` rows with `prior` (its weights as they are now); `window`:
    the longest `window` forward it will run (its cache has that many spare slots)."""

    def __init__(self, prior: PriorTransformer, batch: int, window: int = 1):
        self.prior, self.config = prior, prior.config
        weight = prior.text_embedding.weight
        spare = window if window > 1 else 0
        self.cache = KVCache(prior.config, batch, weight.device, weight.dtype, spare)
        self.positions = prior.image_positions()  # (N, D) row + column embeddings
        self.linears = [  # per block: qkv, attention output, MLP in (then GELU), MLP out
            tuple(affine(m) for m in (b.attention.qkv, b.attention.proj, b.mlp[0], b.mlp[2]))
            for b in prior.blocks
        ]
        self.image_head = partial(linear, affine(prior.to_image_logits))
        self.bias = additive_masks(prior)  # pattern -> (S, S): 0 allowed, -inf not
        # views of each layer's cache, taken once (each indexing op costs a step time):
        # slot p's keys and values (S, B, 2, H, E); keys (B * H, E, S); values (B * H, S, E)
        c = self.config
        BH, S, E = batch * c.heads, c.seq_len + spare, c.dim // c.heads
        self.slots = [kv.permute(3, 1, 0, 2, 4) for kv in self.cache.layers]
        self.keys_t = [kv[0].view(BH, S, E).transpose(1, 2) for kv in self.cache.layers]
        self.values = [kv[1].view(BH, S, E) for kv in self.cache.layers]

    def prefill(self, text: Tensor) -> Tensor:
        """Run the text (B, T) and the start-of-image slot; logits of code 0: (B, image_vocab).
        Rows with the same text share one forward (`prefill`)."""
        return prefill(self.prior, self.cache, text)

    def step(self, code: Tensor) -> Tensor:
        """Feed code p - 1 (B,) into image slot p; logits of code p: (B, image_vocab)."""
        c, cache, prior = self.config, self.cache, self.prior
        B, T, D, H, E = code.shape[0], c.text_seq_len, c.dim, c.heads, c.dim // c.heads
        start = cache.length
        x = F.embedding(code, prior.image_embedding.weight) + self.positions[start - T]
        layers = zip(prior.blocks, prior.patterns, self.linears, strict=True)
        for layer, (block, pattern, (qkv_in, proj, mlp_in, mlp_out)) in enumerate(layers):
            h = F.layer_norm(x, (D,), block.norm_1.weight, block.norm_1.bias)
            qkv = linear(qkv_in, h).view(B, 3, H, E)
            self.slots[layer][start].copy_(qkv[:, 1:])
            out = self._attention(qkv[:, 0].reshape(B * H, 1, E), layer, pattern)
            x = x + linear(proj, out.view(B, D))
            h = F.layer_norm(x, (D,), block.norm_2.weight, block.norm_2.bias)
            x = x + linear(mlp_out, F.gelu(linear(mlp_in, h)))
        cache.length += 1
        h = F.layer_norm(x, (D,), prior.norm.weight, prior.norm.bias)
        return in_fp32(self.image_head, h)

    def window(self, inputs: Tensor, starts: Tensor | int | None = None) -> Tensor:
        """Feed inputs (B, L) into image slots s .. s + L - 1 of each row: s = starts, one per
        row (B,) or one for all (None: the next slot, `cache.length`); inputs[:, 0] is the code
        before slot s, the rest are guesses of the codes after it. Logits of the codes of those
        slots: (B, L, image_vocab), each conditioned on the inputs before it.

        Speculative decoding's verifying forward: every slot's keys and values are written (the
        slots of refused guesses are overwritten by the next window), and `cache.length`
        becomes the end of the furthest row's window. With a start per row, slots past the
        sequence (a row near its end or done) go to the cache's spare slots; their logits mean
        nothing. One start for all rows takes slices (the cheaper path)."""
        c, cache, prior = self.config, self.cache, self.prior
        (B, L), T, S, D = inputs.shape, c.text_seq_len, c.seq_len, c.dim
        H, E, device = c.heads, c.dim // c.heads, inputs.device
        if starts is None or isinstance(starts, int):
            start = cache.length if starts is None else starts
            stop = start + L
            if stop > S:
                raise ValueError(f"a window of {L} from slot {start} ends past the {S} slots")
            positions = self.positions[start - T : stop - T]
            masks = {pattern: bias[start:stop, :stop] for pattern, bias in self.bias.items()}

            def write(layer: int, keys_values: Tensor) -> None:  # (B, L, 2, H, E)
                self.slots[layer][start:stop].copy_(keys_values.transpose(0, 1))

        else:
            slots = starts[:, None] + torch.arange(L, device=device)  # (B, L)
            stop = int(slots.max()) + 1  # the keys any row reads
            if stop > cache.layers[0].shape[3]:
                raise ValueError(f"a window up to slot {stop} needs a KVDecoder(window >= {L})")
            positions = self.positions[(slots - T).clamp(max=c.image_seq_len - 1)]
            # each slot's mask row (a slot past the sequence takes the last one's), keys up to stop
            rows, pad = slots.clamp(max=S - 1), (0, max(0, stop - S))
            masks = {
                pattern: F.pad(bias[rows, : min(stop, S)], pad, value=float("-inf"))[:, None]
                for pattern, bias in self.bias.items()
            }  # (B, 1, L, stop)
            batch_rows = torch.arange(B, device=device)[:, None].expand(B, L)

            def write(layer: int, keys_values: Tensor) -> None:
                cache.layers[layer][:, batch_rows, :, slots] = keys_values

        x = (F.embedding(inputs, prior.image_embedding.weight) + positions).reshape(B * L, D)
        layers = zip(prior.blocks, prior.patterns, self.linears, strict=True)
        for layer, (block, pattern, (qkv_in, proj, mlp_in, mlp_out)) in enumerate(layers):
            h = F.layer_norm(x, (D,), block.norm_1.weight, block.norm_1.bias)
            qkv = linear(qkv_in, h).view(B, L, 3, H, E)
            write(layer, qkv[:, :, 1:])
            out = F.scaled_dot_product_attention(
                qkv[:, :, 0].transpose(1, 2),  # (B, H, L, E)
                cache.layers[layer][0, :, :, :stop],
                cache.layers[layer][1, :, :, :stop],
                attn_mask=masks[pattern],
            )
            x = x + linear(proj, out.transpose(1, 2).reshape(B * L, D))
            h = F.layer_norm(x, (D,), block.norm_2.weight, block.norm_2.bias)
            x = x + linear(mlp_out, F.gelu(linear(mlp_in, h)))
        cache.length = stop
        h = F.layer_norm(x, (D,), prior.norm.weight, prior.norm.bias)
        return in_fp32(self.image_head, h).view(B, L, -1)

    def _attention(self, q: Tensor, layer: int, pattern: str) -> Tensor:
        """Queries (B * H, 1, E) of slot `cache.length` against the cached keys and values that
        slot may see: (B * H, 1, E). Row and conv layers read only the text and the window
        [first_key, slot] of the cache, under one softmax."""
        T, E, start = self.config.text_seq_len, q.shape[-1], self.cache.length
        keys_t, values, stop = self.keys_t[layer], self.values[layer], start + 1
        bias = self.bias[pattern][start]
        lo = T + first_key(pattern, start - T, self.config.grid_size, self.config.conv_kernel)
        if lo == T:  # one product over [text | image slots so far]
            scores = torch.baddbmm(bias[:stop], q, keys_t[:, :, :stop], alpha=E**-0.5)
            return torch.bmm(scores.softmax(-1), values[:, :stop])
        text_scores = torch.bmm(q, keys_t[:, :, :T])
        window_scores = torch.baddbmm(bias[lo:stop], q, keys_t[:, :, lo:stop])
        probs = torch.cat([text_scores, window_scores], -1).mul_(E**-0.5).softmax(-1)
        text_part = torch.bmm(probs[..., :T], values[:, :T])
        return torch.baddbmm(text_part, probs[..., T:], values[:, lo:stop])
