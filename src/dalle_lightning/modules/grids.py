"""Image grids a LightningModule logs at validation: dVAE reconstructions, prior samples."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torchvision.utils import make_grid, save_image


@rank_zero_only
def log_grid(module: LightningModule, images: Tensor, nrow: int, tag: str, folder: str) -> Path:
    """`images` (N, C, H, W) as one grid, `nrow` per row: to every TensorBoard logger as
    `tag` and to <run dir>/<folder>/step_<global step>.png (its path is returned)."""
    grid = make_grid(images.float().clamp(0, 1).cpu(), nrow=nrow, padding=2, pad_value=0.5)
    for logger in module.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, grid, module.global_step)
    out_dir = Path(module.trainer.default_root_dir) / folder
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"step_{module.global_step:07d}.png"
    save_image(grid, path)
    return path
