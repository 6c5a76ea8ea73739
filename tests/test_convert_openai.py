"""Official openai/DALL-E weights load into `DVAE` and compute the same function.

The real weights cannot be downloaded here, so the test builds a model with the official
parameter layout (`blocks.<...>.w/.b`, written after openai/DALL-E `dall_e/encoder.py`,
`decoder.py`, `utils.py`), randomly initialised, and checks outputs after conversion.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from dalle_lightning.models.convert_openai import convert, main
from dalle_lightning.models.dvae import DVAE, map_pixels


class OfficialConv(nn.Module):
    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / (n_in * kw**2) ** 0.5)
        self.b = nn.Parameter(torch.randn(n_out) * 0.1)  # non-zero, so biases are checked too
        self.kw = kw

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class OfficialBlock(nn.Module):
    def __init__(self, n_in, n_out, n_layers, kernels):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = OfficialConv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers = []
        for i, k in enumerate(kernels):
            layers += [
                (f"relu_{i + 1}", nn.ReLU()),
                (f"conv_{i + 1}", OfficialConv(widths[i], widths[i + 1], k)),
            ]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


def official_encoder(n_hid=16, vocab=32, groups=4, blocks=2):
    n_layers = groups * blocks
    layers = [("input", OfficialConv(3, n_hid, 7))]
    n_in = n_hid
    for g in range(groups):
        n_out = 2**g * n_hid
        group = [
            (
                f"block_{i + 1}",
                OfficialBlock(n_in if i == 0 else n_out, n_out, n_layers, (3, 3, 3, 1)),
            )
            for i in range(blocks)
        ]
        if g < groups - 1:
            group.append(("pool", nn.MaxPool2d(2)))
        layers.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
        n_in = n_out
    layers.append(
        ("output", nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=OfficialConv(n_in, vocab, 1))))
    )
    module = nn.Module()
    module.blocks = nn.Sequential(OrderedDict(layers))
    return module


def official_decoder(n_hid=16, n_init=8, vocab=32, groups=4, blocks=2):
    n_layers = groups * blocks
    layers = [("input", OfficialConv(vocab, n_init, 1))]
    n_in = n_init
    for g in range(groups):
        n_out = 2 ** (groups - 1 - g) * n_hid
        group = [
            (
                f"block_{i + 1}",
                OfficialBlock(n_in if i == 0 else n_out, n_out, n_layers, (1, 3, 3, 3)),
            )
            for i in range(blocks)
        ]
        if g < groups - 1:
            group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
        layers.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
        n_in = n_out
    layers.append(
        ("output", nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=OfficialConv(n_in, 6, 1))))
    )
    module = nn.Module()
    module.blocks = nn.Sequential(OrderedDict(layers))
    return module


def test_converted_model_computes_the_official_function():
    torch.manual_seed(0)
    enc, dec = official_encoder(), official_decoder()
    assert "blocks.group_1.block_1.res_path.conv_1.w" in enc.state_dict()
    model = convert(enc.state_dict(), dec.state_dict(), image_size=32)
    cfg = model.config
    assert (cfg.n_hid, cfg.vocab_size, cfg.group_count, cfg.n_blk_per_group, cfg.n_init) == (
        16,
        32,
        4,
        2,
        8,
    )
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        # the official encoder takes pixels already mapped to [eps, 1 - eps]
        assert torch.allclose(model.logits(images), enc.blocks(map_pixels(images)), atol=1e-5)
        z = F.one_hot(torch.randint(0, 32, (2, 4, 4)), 32).permute(0, 3, 1, 2).float()
        assert torch.allclose(model.decode_stats(z), dec.blocks(z), atol=1e-5)


def test_cli_writes_a_checkpoint_that_from_checkpoint_reads(tmp_path):
    torch.manual_seed(1)
    enc, dec = official_encoder(groups=3, blocks=1), official_decoder(groups=3, blocks=1)
    torch.save(enc.state_dict(), tmp_path / "encoder.pt")
    torch.save(dec.state_dict(), tmp_path / "decoder.pt")
    out = main(
        [
            "--encoder",
            str(tmp_path / "encoder.pt"),
            "--decoder",
            str(tmp_path / "decoder.pt"),
            "--out",
            str(tmp_path / "dvae_openai.pt"),
            "--image-size",
            "64",
        ]
    )
    model = DVAE.from_checkpoint(out)
    assert model.config.image_size == 64 and model.config.grid_size == 16
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.logits(images), enc.blocks(map_pixels(images)), atol=1e-5)
