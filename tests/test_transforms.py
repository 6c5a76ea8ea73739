"""The paper's preprocessing (Listings 1 and 2) and the deterministic eval transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_lightning.data.transforms import DVAETransform, EvalTransform, PriorTransform


def _two_halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue: flips and crops are visible."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2, 0] = 255
    pixels[:, width // 2 :, 2] = 255
    return Image.fromarray(pixels)


@pytest.mark.parametrize("transform_cls", [DVAETransform, PriorTransform, EvalTransform])
@pytest.mark.parametrize("size", [(300, 200), (200, 300), (64, 64), (40, 30)])
def test_output_shape_and_range(transform_cls, size):
    out = transform_cls(64)(_two_halves(*size), torch.Generator().manual_seed(0))
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("transform_cls", [DVAETransform, PriorTransform])
def test_seeded_generator_repeats(transform_cls):
    image = _two_halves(400, 300)
    a = transform_cls(64)(image, torch.Generator().manual_seed(5))
    b = transform_cls(64)(image, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_dvae_transform_flips_and_prior_transform_never_does():
    image = _two_halves(256, 256)
    g = torch.Generator().manual_seed(0)
    dvae_left_red = [DVAETransform(64)(image, g)[0, :, :4].mean() > 0.5 for _ in range(40)]
    assert 5 < sum(dvae_left_red) < 35  # about half flipped
    prior = [PriorTransform(64)(image, g) for _ in range(40)]
    assert all(p[0, :, :4].mean() > 0.5 and p[2, :, -4:].mean() > 0.5 for p in prior)


def test_prior_crop_stays_near_the_centre():
    # a wide image whose outer eighths are green: Listing 2's offsets stay within [3/8, 5/8]
    # of the slack, so no green ever enters the crop
    pixels = np.zeros((100, 260, 3), dtype=np.uint8)
    pixels[:, :20, 1] = 255
    pixels[:, -20:, 1] = 255
    image = Image.fromarray(pixels)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        assert PriorTransform(64)(image, g)[1].max() == 0


def test_dvae_transform_resizes_within_9_8_to_12_8():
    # on a 1-pixel checkerboard the AREA resize to t in [72, 96] from 512 averages to grey
    pixels = (np.indices((512, 512)).sum(0) % 2 * 255).astype(np.uint8)
    image = Image.fromarray(np.stack([pixels] * 3, -1))
    out = DVAETransform(64)(image, torch.Generator().manual_seed(0))
    assert out.std() < 0.1


def test_eval_transform_is_resize_short_side_then_centre_crop():
    pixels = np.zeros((128, 256, 3), dtype=np.uint8)
    pixels[:, 96:160] = 255  # a white band in the middle third of a wide image
    out = EvalTransform(64)(Image.fromarray(pixels))
    # short side 128 -> 64, width 256 -> 128, crop columns 32..96 -> the band is columns 16..48
    assert out[:, :, 17:47].min() == 1 and out[:, :, :15].max() == 0 and out[:, :, 49:].max() == 0
    assert torch.equal(out, EvalTransform(64)(Image.fromarray(pixels)))
