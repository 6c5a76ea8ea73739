"""`python evaluate.py task=generate`: images for captions from a stage-2 checkpoint.

One PNG grid per prompt (`num_images` samples, seeded by `seed` + the prompt's index) under
<run dir>/generated/, each path printed as it is written.
"""

from __future__ import annotations

import re
from pathlib import Path

from torchvision.utils import make_grid, save_image

from dalle_lightning.models.dalle import DALLE
from dalle_lightning.sampling.sampler import SamplingConfig


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "prompt"


def generate_grids(
    model: DALLE,
    prompts: list[str],
    num_images: int,
    sampling: SamplingConfig,
    seed: int,
    out_dir: Path,
    batch_size: int = 64,
) -> list[dict]:
    """[{"prompt", "png"}] of the grids written to `out_dir`, in prompt order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, prompt in enumerate(prompts):
        images = model.generate(
            [prompt], num_images, seed=seed + i, sampling=sampling, batch_size=batch_size
        )
        path = out_dir / f"{i:03d}_{slug(prompt)}.png"
        save_image(make_grid(images, nrow=min(num_images, 8), padding=2, pad_value=0.5), path)
        files.append({"prompt": prompt, "png": str(path)})
        print(path, flush=True)
    return files
