"""The paper's image preprocessing for real photographs (Ramesh et al., 2021, appendix A.2, B.2).

- `DVAETransform`: Listing 1 — random square crop of the full short side, AREA resize to a
  random t in [9/8, 12/8] x res, random res x res crop, random horizontal flip.
- `PriorTransform`: Listing 2 — near-centre square crop (offset drawn in [3/8, 5/8] of the
  slack), AREA resize to t in [res, 9/8 res], random crop, no flip (captions say "left").
- `EvalTransform`: resize the short side to res, centre crop (deterministic; for FID/IS).

Each takes a PIL image and returns a float tensor (3, res, res) in [0, 1]. Randomness comes
from torch's generator, so DataLoader workers are seeded by Lightning like everything else.
AREA resizing is PIL's BOX filter; images smaller than the target are upsampled (bicubic)
instead of failing, which the paper's filtered data never needed.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, max(high, low) + 1, (1,), generator=generator))


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    shrinking = size[0] <= image.width and size[1] <= image.height
    return image.resize(size, Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC)


def _to_tensor(image: Image.Image) -> Tensor:
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255


def _random_crop(image: Image.Image, size: int, generator: torch.Generator | None) -> Image.Image:
    left = _randint(0, image.width - size, generator)
    top = _randint(0, image.height - size, generator)
    return image.crop((left, top, left + size, top + size))


class DVAETransform:
    """Listing 1 of the paper (dVAE training)."""

    def __init__(self, resolution: int):
        self.resolution = resolution

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Tensor:
        res = self.resolution
        s_min = min(image.size)
        image = _random_crop(image, s_min, generator)
        t_min = min(s_min, round(9 / 8 * res))
        t_max = min(s_min, round(12 / 8 * res))
        t = max(_randint(t_min, t_max, generator), res)
        image = _random_crop(_resize(image, (t, t)), res, generator)
        if torch.rand((), generator=generator) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_tensor(image)


class PriorTransform:
    """Listing 2 of the paper (transformer training): no flip, near-centre crop."""

    def __init__(self, resolution: int):
        self.resolution = resolution

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Tensor:
        res = self.resolution
        w, h = image.size
        s_min = min(w, h)
        offsets = []
        for side in (h, w):
            slack = side - s_min
            low = 3 * slack // 8
            offsets.append(_randint(low, max(low + 1, 5 * slack // 8) - 1, generator))
        off_h, off_w = offsets
        image = image.crop((off_w, off_h, off_w + s_min, off_h + s_min))
        t_max = min(s_min, round(9 / 8 * res))
        t = max(_randint(res, t_max, generator), res)
        image = _random_crop(_resize(image, (t, t)), res, generator)
        return _to_tensor(image)


class EvalTransform:
    """Resize the short side to `resolution`, then centre crop: the same pixels every time."""

    def __init__(self, resolution: int):
        self.resolution = resolution

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Tensor:
        res = self.resolution
        w, h = image.size
        scale = res / min(w, h)
        new_w, new_h = max(res, round(w * scale)), max(res, round(h * scale))
        image = _resize(image, (new_w, new_h))
        left, top = (new_w - res) // 2, (new_h - res) // 2
        return _to_tensor(image.crop((left, top, left + res, top + res)))


# `dataset.train_transform`: the training split's preprocessing by name
TRANSFORMS = {"dvae": DVAETransform, "prior": PriorTransform, "eval": EvalTransform}
