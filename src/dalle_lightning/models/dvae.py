"""Discrete VAE, stage 1 of DALL-E (Ramesh et al., 2021, sec. 2.1 and appendix A).

The architecture is the official one (openai/DALL-E `dall_e/encoder.py`, `decoder.py`), with
every size configurable and state_dict keys that mirror the official layout
(`encoder.blocks.group_1.block_1.res_path.conv_1.weight`, ...), so the official weights load
through `convert_openai.py`.

Shape legend:
    B batch, C image channels (3), H = W = image_size,
    K vocab_size (codebook), h = w = grid_size = H / 2**(group_count - 1).

Pixels are modelled with the logit-Laplace distribution (paper sec. A.3): the encoder sees
x mapped to [eps, 1 - eps], and the decoder outputs, per channel, the location mu (first C
channels) and log-scale ln b (last C channels) of that distribution.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_lightning.checkpoints import read_dvae
from dalle_lightning.config import ConfigError, require, require_int
from dalle_lightning.models.fp32 import in_fp32

LOGIT_LAPLACE_EPS = 0.1  # paper sec. A.3


def map_pixels(x: Tensor, eps: float = LOGIT_LAPLACE_EPS) -> Tensor:
    """[0, 1] -> [eps, 1 - eps], the support the logit-Laplace likelihood is evaluated on."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: Tensor, eps: float = LOGIT_LAPLACE_EPS) -> Tensor:
    return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)


@dataclass(frozen=True)
class DVAEConfig:
    """Sizes of the dVAE. Paper: 256 px, n_hid 256, n_init 128, vocab 8192, 4 groups of 2."""

    image_size: int = 64
    input_channels: int = 3
    vocab_size: int = 512
    n_hid: int = 32
    n_init: int = 32
    group_count: int = 3
    n_blk_per_group: int = 1

    def __post_init__(self) -> None:
        require_int("image_size", self.image_size, 8)
        require_int("input_channels", self.input_channels, 1)
        require_int("vocab_size", self.vocab_size, 2)
        require_int("n_init", self.n_init, 1)
        require_int("n_blk_per_group", self.n_blk_per_group, 1)
        require_int("group_count", self.group_count, 1)
        # The bottleneck width is n_out / 4 (paper sec. A.1), so n_hid must give whole channels.
        require_int("n_hid", self.n_hid, 4)
        require(
            self.n_hid % 4 == 0, "n_hid", self.n_hid, "a multiple of 4 (bottleneck width n_hid/4)"
        )
        factor = self.downsample
        require(
            self.image_size % factor == 0,
            "image_size",
            self.image_size,
            f"a multiple of {factor} (= 2**(group_count-1) with group_count={self.group_count}),"
            f" e.g. {max(factor, round(self.image_size / factor) * factor)}",
        )

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def n_layers(self) -> int:
        return self.group_count * self.n_blk_per_group


def gumbel_softmax(logits: Tensor, tau: float, hard: bool = False, dim: int = 1) -> Tensor:
    """softmax((logits + g) / tau) with g ~ Gumbel(0, 1), i.i.d.; straight-through if `hard`.

    Same distribution as `F.gumbel_softmax`, whose `exponential_` sampler is slower on CPU
    (it dominated the dVAE step at 64 px); g = -log(-log u) with u ~ U(0, 1) instead.
    """
    tiny = torch.finfo(logits.dtype).tiny
    u = torch.empty_like(logits).uniform_(tiny, 1.0)
    gumbels = -torch.log((-torch.log(u)).clamp_min(tiny))
    soft = torch.softmax((logits + gumbels) / tau, dim=dim)
    if not hard:
        return soft
    index = soft.argmax(dim, keepdim=True)
    one_hot = torch.zeros_like(soft).scatter_(dim, index, 1.0)
    return one_hot - soft.detach() + soft


class DVAEOutput(NamedTuple):
    """What `DVAE.forward` always returns."""

    logits: Tensor  # (B, K, h, w) logits of q_phi(z | x)
    z: Tensor  # (B, K, h, w) relaxed one-hot sample (Gumbel-softmax at temperature tau)
    stats: Tensor  # (B, 2C, H, W) logit-Laplace mu (first C) and ln b (last C)
    reconstruction: Tensor  # (B, C, H, W) in [0, 1], the mean image given z


class ResBlock(nn.Module):
    """Bottleneck residual block: id_path(x) + post_gain * res_path(x) (paper sec. A.1).

    The encoder's residual path uses kernels (3, 3, 3, 1), the decoder's (1, 3, 3, 3).
    post_gain = 1 / n_layers**2 keeps the sum of residuals near identity at init.

    `upsample_input` (the first block of every decoder group but the first) computes
    block(upsample(x)), with upsample the official decoder's 2x nearest-neighbour upsampling at
    the end of the group before. Nearest upsampling commutes with ReLU and with 1x1
    convolutions, so the id path and the residual path's ReLU + 1x1 conv run on the input's
    pixels, a quarter of the output's, and their results are upsampled: the same function
    (outputs bitwise equal; tests/test_dvae.py; gradients equal to 2e-7 relative), a ~1.2x
    faster dVAE training step on CPU. Trained over eight seeds it scored within the seeds'
    spread of the old order (docs/results.md).
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_layers: int,
        kernels: tuple[int, int, int, int],
        upsample_input: bool = False,
    ):
        super().__init__()
        if upsample_input and kernels[0] != 1:
            raise ValueError(f"upsample_input needs a 1x1 first kernel, not {kernels}")
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.upsample_input = upsample_input
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers = OrderedDict()
        for i, k in enumerate(kernels):
            layers[f"relu_{i + 1}"] = nn.ReLU()
            layers[f"conv_{i + 1}"] = nn.Conv2d(widths[i], widths[i + 1], k, padding=(k - 1) // 2)
        self.res_path = nn.Sequential(layers)

    def forward(self, x: Tensor) -> Tensor:
        # id + post_gain * res as one op (`alpha` scales inside the add), no tensor for the
        # scaled residual (docs/speed.md): bitwise the two ops when post_gain is a power of two
        # (4 or 8 layers: the default's, the paper's; the scaling is exact above float32's
        # subnormals), at most one rounding apart otherwise
        if not self.upsample_input:
            return torch.add(self.id_path(x), self.res_path(x), alpha=self.post_gain)
        identity = upsample2x(self.id_path(x))
        h = upsample2x(self.res_path[:2](x))  # relu_1, conv_1 (1x1) at the input's resolution
        return torch.add(identity, self.res_path[2:](h), alpha=self.post_gain)


def upsample2x(x: Tensor) -> Tensor:
    """Nearest-neighbour 2x upsampling, the official decoder's `nn.Upsample(scale_factor=2)`."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


class ResBlockGroup(nn.Sequential):
    """One resolution of the encoder or decoder: its resblocks, then the encoder's pooling (a
    decoder group's first block upsamples its input instead: `ResBlock.upsample_input`).
    Its own class so that FSDP can wrap and checkpoint it as a unit (conf/trainer/fsdp.yaml)."""


def _group(
    n_in: int,
    n_out: int,
    cfg: DVAEConfig,
    kernels: tuple,
    pool: bool = False,
    upsample_input: bool = False,
) -> ResBlockGroup:
    """`n_blk_per_group` resblocks (the first one changes the width and may upsample its
    input), then the encoder's 2x max pooling if `pool`."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        (
            f"block_{i + 1}",
            ResBlock(
                n_in if i == 0 else n_out,
                n_out,
                cfg.n_layers,
                kernels,
                upsample_input=upsample_input and i == 0,
            ),
        )
        for i in range(cfg.n_blk_per_group)
    )
    if pool:
        layers["pool"] = nn.MaxPool2d(2)
    return ResBlockGroup(layers)


class Encoder(nn.Module):
    """x (B, C, H, W) mapped to [eps, 1-eps] -> logits (B, K, h, w)."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        G, n = cfg.group_count, cfg.n_hid
        layers = OrderedDict(input=nn.Conv2d(cfg.input_channels, n, 7, padding=3))
        n_in = n
        for g in range(G):
            n_out = 2**g * n  # widths 1, 2, 4, 8 x n_hid
            layers[f"group_{g + 1}"] = _group(n_in, n_out, cfg, (3, 3, 3, 1), pool=g < G - 1)
            n_in = n_out
        layers["output"] = nn.Sequential(
            OrderedDict(relu=nn.ReLU(), conv=nn.Conv2d(n_in, cfg.vocab_size, 1))
        )
        self.blocks = nn.Sequential(layers)

    def forward(self, x: Tensor) -> Tensor:
        return in_fp32(self.blocks.output, self.blocks[:-1](x))  # code logits in fp32


class Decoder(nn.Module):
    """z (B, K, h, w), one-hot or relaxed -> stats (B, 2C, H, W)."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        G, n = cfg.group_count, cfg.n_hid
        layers = OrderedDict(input=nn.Conv2d(cfg.vocab_size, cfg.n_init, 1))
        n_in = cfg.n_init
        for g in range(G):
            n_out = 2 ** (G - 1 - g) * n  # widths 8, 4, 2, 1 x n_hid
            # groups 2..G start at twice the resolution of the one before (ResBlock docstring)
            layers[f"group_{g + 1}"] = _group(n_in, n_out, cfg, (1, 3, 3, 3), upsample_input=g > 0)
            n_in = n_out
        layers["output"] = nn.Sequential(
            OrderedDict(relu=nn.ReLU(), conv=nn.Conv2d(n_in, 2 * cfg.input_channels, 1))
        )
        self.blocks = nn.Sequential(layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.blocks[1:](in_fp32(self.blocks.input, z))  # reads the codes in fp32


class DVAE(nn.Module):
    """Encoder q_phi(z|x) and decoder p_theta(x|z) over a grid of `vocab_size`-way codes."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Conv weights ~ N(0, 1/sqrt(fan_in)), zero bias, as in openai/DALL-E `utils.Conv2d`."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                nn.init.normal_(m.weight, std=1 / math.sqrt(fan_in))
                nn.init.zeros_(m.bias)

    # image tokenizer interface (used by the prior and by evaluation)
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    def logits(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) in [0, 1] -> logits (B, K, h, w)."""
        return self.encoder(map_pixels(images))

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) in [0, 1] -> codes (B, h, w) long: argmax, no Gumbel noise."""
        return self.logits(images).argmax(dim=1)

    def decode_stats(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    @staticmethod
    def mean_image(stats: Tensor, clamp: bool = True) -> Tensor:
        """The image the decoder predicts: unmap(sigmoid(mu)), clamped to [0, 1] by default.

        Unclamped, values lie in [-eps, 1 + eps] / (1 - 2 eps) and keep their gradient where
        the clamp would cut it (the `mse` loss needs that for pixels predicted below 0).
        """
        channels = stats.shape[1] // 2
        mean = torch.sigmoid(stats[:, :channels])
        if clamp:
            return unmap_pixels(mean)
        return (mean - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """codes (B, h, w) long -> images (B, C, H, W) in [0, 1]."""
        z = F.one_hot(codes, self.config.vocab_size).permute(0, 3, 1, 2)  # (B, K, h, w)
        dtype = self.decoder.blocks.input.weight.dtype
        return self.mean_image(self.decoder(z.to(dtype)))

    def forward(self, images: Tensor, tau: float = 1.0, hard: bool = False) -> DVAEOutput:
        """Gumbel-softmax relaxation of q_phi(z|x) at temperature tau (paper sec. 2.1)."""
        logits = self.logits(images)
        z = gumbel_softmax(logits, tau, hard)
        stats = self.decoder(z)
        return DVAEOutput(logits, z, stats, self.mean_image(stats))

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, map_location: str | torch.device = "cpu", field: str = "ckpt_path"
    ) -> DVAE:
        """Rebuild from a dVAE training checkpoint or an exported file alone (`checkpoints.py`);
        a file that is not one is a `ConfigError` on `field`."""
        config, state = read_dvae(path, field, map_location)
        try:
            model = cls(DVAEConfig(**config))
        except ConfigError as err:
            raise ConfigError(
                field, str(path), f"a dVAE whose stored config is valid ({err})"
            ) from None
        model.load_state_dict(state, strict=True)
        return model.eval()
