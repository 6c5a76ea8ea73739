"""The dVAE's contract: shapes, return types, state_dict keys, init, checkpoints, Gumbel-softmax."""

from __future__ import annotations

import math

import pytest
import torch

from dalle_lightning.checkpoints import export_dvae
from dalle_lightning.config import ConfigError
from dalle_lightning.models.dvae import (
    DVAE,
    DVAEConfig,
    DVAEOutput,
    ResBlock,
    gumbel_softmax,
    upsample2x,
)
from dalle_lightning.models.image_tokenizer import ImageTokenizer

SMALL = DVAEConfig(
    image_size=32, vocab_size=64, n_hid=16, n_init=8, group_count=3, n_blk_per_group=1
)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return DVAE(SMALL)


def test_encode_decode_forward_shapes_and_types(model):
    images = torch.rand(2, 3, 32, 32)
    codes = model.encode(images)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 64
    decoded = model.decode(codes)
    assert decoded.shape == (2, 3, 32, 32)
    assert float(decoded.min()) >= 0 and float(decoded.max()) <= 1
    out = model(images, tau=0.5)
    assert isinstance(out, DVAEOutput)
    assert out.logits.shape == (2, 64, 8, 8)
    assert out.z.shape == (2, 64, 8, 8)
    assert torch.allclose(out.z.sum(1), torch.ones(2, 8, 8), atol=1e-5)
    assert out.stats.shape == (2, 6, 32, 32)
    assert out.reconstruction.shape == (2, 3, 32, 32)


def test_encode_is_argmax_without_noise(model):
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(model.encode(images), model.encode(images))
    assert torch.equal(model.encode(images), model.logits(images).argmax(1))


def test_decode_equals_decoder_on_one_hot(model):
    codes = torch.randint(0, 64, (2, 8, 8))
    z = torch.nn.functional.one_hot(codes, 64).permute(0, 3, 1, 2).float()
    expected = DVAE.mean_image(model.decode_stats(z))
    assert torch.allclose(model.decode(codes), expected)


def test_state_dict_keys_follow_the_official_layout():
    model = DVAE(DVAEConfig(image_size=16, vocab_size=8, n_hid=8, n_init=4, group_count=2))
    res = [f"res_path.conv_{i}.{p}" for i in range(1, 5) for p in ("weight", "bias")]
    expected = set()
    for part in ("encoder", "decoder"):
        expected |= {f"{part}.blocks.input.weight", f"{part}.blocks.input.bias"}
        expected |= {f"{part}.blocks.output.conv.weight", f"{part}.blocks.output.conv.bias"}
        for g in (1, 2):
            expected |= {f"{part}.blocks.group_{g}.block_1.{r}" for r in res}
    # width changes (1x1 identity path): encoder group 2 (8 -> 16), decoder group 1 (4 -> 16)
    # and group 2 (16 -> 8)
    for key in ("encoder.blocks.group_2", "decoder.blocks.group_1", "decoder.blocks.group_2"):
        expected |= {f"{key}.block_1.id_path.weight", f"{key}.block_1.id_path.bias"}
    assert set(model.state_dict()) == expected
    sd = model.state_dict()
    assert sd["encoder.blocks.input.weight"].shape == (8, 3, 7, 7)
    assert sd["encoder.blocks.output.conv.weight"].shape == (8, 16, 1, 1)
    assert sd["decoder.blocks.input.weight"].shape == (4, 8, 1, 1)
    assert sd["decoder.blocks.output.conv.weight"].shape == (6, 8, 1, 1)
    # bottleneck width n_out / 4, kernels (3, 3, 3, 1) in the encoder, (1, 3, 3, 3) in the decoder
    assert sd["encoder.blocks.group_2.block_1.res_path.conv_1.weight"].shape == (4, 8, 3, 3)
    assert sd["encoder.blocks.group_2.block_1.res_path.conv_4.weight"].shape == (16, 4, 1, 1)
    assert sd["decoder.blocks.group_1.block_1.res_path.conv_1.weight"].shape == (4, 4, 1, 1)
    assert sd["decoder.blocks.group_1.block_1.res_path.conv_2.weight"].shape == (4, 4, 3, 3)


@pytest.mark.parametrize("n_in", [32, 16])  # a 1x1 conv id path, and the identity
def test_upsampling_block_is_the_block_after_upsampling(n_in):
    """A decoder block with `upsample_input` runs its 1x1 parts before upsampling: the same
    outputs (bitwise) and parameter gradients (to rounding) as upsampling first, as the official
    decoder does."""
    torch.manual_seed(0)
    block = ResBlock(n_in, 16, 6, (1, 3, 3, 3), upsample_input=True)
    for p in block.parameters():  # non-zero biases, so they are checked too
        torch.nn.init.normal_(p, std=0.3)
    plain = ResBlock(n_in, 16, 6, (1, 3, 3, 3))
    plain.load_state_dict(block.state_dict())
    x = torch.randn(2, n_in, 5, 7)
    out, ref = block(x), plain(upsample2x(x))
    assert out.shape == (2, 16, 10, 14) and torch.equal(out, ref)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), list(block.parameters()))
    ref_grads = torch.autograd.grad((ref * weight).sum(), list(plain.parameters()))
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="1x1 first kernel"):
        ResBlock(16, 16, 6, (3, 3, 3, 1), upsample_input=True)


def test_init_is_normal_with_std_one_over_sqrt_fan_in():
    torch.manual_seed(0)
    model = DVAE(DVAEConfig(image_size=32, vocab_size=512, n_hid=64, n_init=32))
    conv = model.encoder.blocks.output.conv  # fan_in = 4 * 64
    assert conv.weight.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.05)
    assert torch.count_nonzero(conv.bias) == 0


def test_residual_post_gain_is_one_over_layers_squared():
    model = DVAE(DVAEConfig(image_size=32, n_hid=16, group_count=3, n_blk_per_group=2))
    assert model.encoder.blocks.group_1.block_1.post_gain == pytest.approx(1 / 36)


@pytest.mark.parametrize("n_layers, bitwise", [(4, True), (8, True), (6, False)])
@pytest.mark.parametrize("upsample_input", [False, True])
def test_the_residual_sum_is_id_plus_post_gain_times_res(n_layers, bitwise, upsample_input):
    """The block adds post_gain * res_path in one op (`torch.add(alpha=)`): with a power-of-two
    post_gain (4 or 8 layers: the default's and the paper's) its outputs and gradients are
    bitwise those of the two ops `id + post_gain * res`; otherwise equal to one rounding."""
    torch.manual_seed(0)
    kernels = (1, 3, 3, 3) if upsample_input else (3, 3, 3, 1)
    block = ResBlock(32, 16, n_layers, kernels, upsample_input=upsample_input)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 32, 6, 6, requires_grad=True)
    if upsample_input:
        identity = upsample2x(block.id_path(x))
        res = block.res_path[2:](upsample2x(block.res_path[:2](x)))
    else:
        identity, res = block.id_path(x), block.res_path(x)
    ref, out = identity + block.post_gain * res, block(x)
    weight = torch.randn_like(out)
    params = [x, *block.parameters()]
    grads = torch.autograd.grad((out * weight).sum(), params)
    ref_grads = torch.autograd.grad((ref * weight).sum(), params)
    if bitwise:
        assert torch.equal(out, ref)
        assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads, strict=True))
    else:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_paper_sizes_give_32x32_grid_of_8192_codes():
    cfg = DVAEConfig(
        image_size=256, vocab_size=8192, n_hid=256, n_init=128, group_count=4, n_blk_per_group=2
    )
    with torch.device("meta"):
        model = DVAE(cfg)
    assert cfg.grid_size == 32
    codes_shape = model.encoder(torch.empty(1, 3, 256, 256, device="meta")).shape
    assert codes_shape == (1, 8192, 32, 32)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("image_size", dict(image_size=50, group_count=3)),
        ("n_hid", dict(n_hid=30)),
        ("vocab_size", dict(vocab_size=1)),
        ("group_count", dict(group_count=0)),
    ],
)
def test_invalid_sizes_name_the_field(field, kwargs):
    with pytest.raises(ConfigError) as err:
        DVAEConfig(**kwargs)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}=")


def test_image_size_error_says_what_divides():
    with pytest.raises(ConfigError, match=r"image_size=50 is invalid: a multiple of 4"):
        DVAEConfig(image_size=50, group_count=3)


def test_export_round_trip_through_from_checkpoint(model, tmp_path):
    path = tmp_path / "dvae.pt"
    torch.save(export_dvae(model), path)
    loaded = DVAE.from_checkpoint(path)
    assert loaded.config == SMALL
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.encode(images), model.encode(images))


def test_from_checkpoint_rejects_other_files_naming_the_field(tmp_path):
    """One error type from every layer: a ConfigError on the field the file came from."""
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(ConfigError, match="is invalid: a dVAE checkpoint") as err:
        DVAE.from_checkpoint(path, field="model.dvae_ckpt")
    assert err.value.field == "model.dvae_ckpt"
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="broken.pt.* truncated or corrupt"):
        DVAE.from_checkpoint(broken)
    with pytest.raises(ConfigError, match="an existing checkpoint file") as err:
        DVAE.from_checkpoint(tmp_path / "missing.pt")
    assert err.value.field == "ckpt_path"


def test_gumbel_softmax_samples_the_categorical():
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0]).repeat(100_000, 1)
    z = gumbel_softmax(logits, tau=0.01, dim=1)
    freq = torch.bincount(z.argmax(1), minlength=4).float() / 100_000
    assert torch.allclose(freq, torch.softmax(logits[0], 0), atol=0.01)


def test_gumbel_softmax_hard_is_one_hot_with_soft_gradient():
    logits = torch.randn(3, 5, requires_grad=True)
    z = gumbel_softmax(logits, tau=1.0, hard=True, dim=1)
    assert torch.equal(z.detach().sum(1), torch.ones(3))
    assert set(z.detach().unique().tolist()) <= {0.0, 1.0}
    (z * torch.arange(5.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_dvae_is_an_image_tokenizer(model):
    assert isinstance(model, ImageTokenizer)
