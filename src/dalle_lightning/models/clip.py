"""A small contrastive text-image model (CLIP, Radford et al., 2021) for reranking on CPU.

DALL-E reranks its samples with a pretrained CLIP (Ramesh et al., 2021, sec. 2.3); no
pretrained weights can be downloaded on the machines this project is tested on, and a CLIP
trained on web images knows nothing of the built-in shapes anyway. This one is trained on a
project dataset (`python train.py model=clip`):

- text: the project's BPE ids (per-position pad ids included, see `text/tokenizer.py`) ->
  token + position embeddings -> pre-LayerNorm transformer encoder -> mean over the caption's
  real tokens (pads excluded) -> linear projection;
- image: strided conv stack -> adaptive average pool to a `pool` x `pool` grid (keeps where
  things are: captions say "on the left") -> linear projection;
- both embeddings L2-normalised; similarity logits = exp(logit_scale) * cosine, with the
  temperature learned (initialised to 1/0.07, clamped at 100, as CLIP).

Shape legend: B batch, T text_seq_len, D width, E embed_dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_lightning.config import require, require_int

MAX_LOGIT_SCALE = math.log(100.0)


@dataclass(frozen=True)
class ClipConfig:
    """Sizes of the in-project CLIP (conf/model/clip.yaml's `net`)."""

    DERIVED: ClassVar[str] = "text_vocab is model.vocab_size, the BPE tokenizer's"

    text_vocab: int = 512  # BPE ids; the embedding also holds text_seq_len pad ids
    text_seq_len: int = 32
    text_dim: int = 128
    text_depth: int = 2
    text_heads: int = 4
    image_size: int = 64
    image_channels: tuple[int, ...] = (32, 64, 128, 128)  # one stride-2 conv each
    pool: int = 4
    embed_dim: int = 128

    def __post_init__(self) -> None:
        for name in ("text_vocab", "text_seq_len", "text_dim", "text_depth", "text_heads"):
            require_int(name, getattr(self, name), 1)
        for name in ("image_size", "pool", "embed_dim"):
            require_int(name, getattr(self, name), 1)
        require(
            self.text_dim % self.text_heads == 0,
            "text_dim",
            self.text_dim,
            f"a multiple of text_heads={self.text_heads}",
        )
        channels = tuple(self.image_channels)
        require(
            len(channels) > 0 and all(isinstance(c, int) and c >= 1 for c in channels),
            "image_channels",
            list(channels),
            "a non-empty list of integers >= 1",
        )
        object.__setattr__(self, "image_channels", channels)


class TextEncoder(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.vocab = cfg.text_vocab
        self.token = nn.Embedding(cfg.text_vocab + cfg.text_seq_len, cfg.text_dim)
        self.position = nn.Embedding(cfg.text_seq_len, cfg.text_dim)
        layer = nn.TransformerEncoderLayer(
            cfg.text_dim,
            cfg.text_heads,
            4 * cfg.text_dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.text_depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.text_dim)
        self.proj = nn.Linear(cfg.text_dim, cfg.embed_dim, bias=False)

    def forward(self, text: Tensor) -> Tensor:
        """(B, T) ids -> (B, E), unnormalised."""
        positions = torch.arange(text.shape[1], device=text.device)
        x = self.norm(self.blocks(self.token(text) + self.position(positions)))
        real = (text < self.vocab).unsqueeze(-1).to(x.dtype)  # pad ids are >= vocab
        pooled = (x * real).sum(1) / real.sum(1).clamp(min=1)
        return self.proj(pooled)


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        layers, c_in = [], 3
        for c_out in cfg.image_channels:
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                nn.GroupNorm(min(8, c_out), c_out),
                nn.GELU(),
            ]
            c_in = c_out
        self.convs = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(cfg.pool), nn.Flatten())
        self.proj = nn.Linear(c_in * cfg.pool**2, cfg.embed_dim, bias=False)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, E), unnormalised."""
        return self.proj(self.convs(images * 2 - 1))


class ContrastiveModel(nn.Module):
    def __init__(self, config: ClipConfig):
        super().__init__()
        self.config = config
        self.text = TextEncoder(config)
        self.image = ImageEncoder(config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, text: Tensor) -> Tensor:
        return F.normalize(self.text(text), dim=-1)

    def encode_image(self, images: Tensor) -> Tensor:
        return F.normalize(self.image(images), dim=-1)

    def scale(self) -> Tensor:
        """1 / temperature, learned, clamped at 100 (as CLIP)."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def logits(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        """(B, B) from normalised embeddings: row i = image i against every caption."""
        return self.scale() * image_emb @ text_emb.T

    def forward(self, text: Tensor, images: Tensor) -> Tensor:
        """(B, B) logits: row i = image i against every caption, scaled by the temperature."""
        return self.logits(self.encode_image(images), self.encode_text(text))

    def similarity(self, text: Tensor, images: Tensor) -> Tensor:
        """(B,) cosine similarity of image i and caption i (the reranking score)."""
        return (self.encode_image(images) * self.encode_text(text)).sum(-1)


def contrastive_loss(logits: Tensor) -> Tensor:
    """Symmetric InfoNCE: image i should pick caption i among the batch, and vice versa."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def recall_at_1(image_emb: Tensor, text_emb: Tensor, captions: list[str]) -> tuple[float, float]:
    """(image->text, text->image) R@1 over N matching pairs, (N, E) each. A retrieval counts
    as right when the retrieved item's caption is the query's caption: the built-in shapes
    repeat captions, and the images of one caption are equally right."""
    sim = image_emb @ text_emb.T
    i2t = [captions[j] == captions[i] for i, j in enumerate(sim.argmax(1).tolist())]
    t2i = [captions[j] == captions[i] for i, j in enumerate(sim.argmax(0).tolist())]
    return sum(i2t) / len(i2t), sum(t2i) / len(t2i)
