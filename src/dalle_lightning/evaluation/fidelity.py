"""FID and IS with torch-fidelity, on folders of PNGs (Ramesh et al., 2021, sec. 3.1).

The paper compares generated and real images after a Gaussian blur of the same radius on
both sides (its Fig. 9: blur radius 0-8), so `blur_folder` writes a blurred copy of a folder
and the metrics are computed between two folders blurred alike.

Inception weights: torch-fidelity downloads its own (`weights-inception-2015-12-05-6726825d.pth`)
unless `inception_weights=PATH` names a local copy; `weights_record` says which file was
used (path and sha256). A failed download ends with one line naming that override.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from PIL import Image, ImageFilter
from torch import Tensor

from dalle_lightning.checkpoints import file_sha256

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def save_images(
    images: Tensor, folder: str | Path, start: int = 0, names: list[str] | None = None
) -> list[Path]:
    """(N, 3, H, W) in [0, 1] -> 8-bit lossless PNGs <folder>/<name>.png, named `names` or
    numbered <index:06d> from `start`. Each file is written under a temporary name and
    renamed, so a killed run never leaves a truncated image behind."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    names = names or [f"{i:06d}" for i in range(start, start + len(pixels))]
    paths = []
    for name, image in zip(names, pixels, strict=True):
        path = folder / f"{name}.png"
        partial = folder / f".{name}.partial"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(partial, format="PNG")
        partial.replace(path)
        paths.append(path)
    return paths


def load_images(paths: list[Path]) -> Tensor:
    """PNG files -> (N, 3, H, W) float in [0, 1], exactly the pixels `save_images` wrote."""
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(torch.from_numpy(np.asarray(image.convert("RGB")).copy()))
    return torch.stack(arrays).permute(0, 3, 1, 2).float() / 255


def blur_folder(source: str | Path, target: str | Path, radius: float) -> Path:
    """Every PNG/JPEG of `source` blurred with a Gaussian of `radius` pixels into `target`."""
    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            with Image.open(path) as image:
                blurred = image.convert("RGB").filter(ImageFilter.GaussianBlur(radius))
            blurred.save(target / f"{path.stem}.png")
    return target


def fid_and_is(
    generated: str | Path,
    real: str | Path,
    inception_weights: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    isc_splits: int = 10,
    real_cache: tuple[str | Path, str] | None = None,
) -> dict:
    """{"fid", "is_mean", "is_std"} of the images in folder `generated` against folder `real`
    (IS of the generated ones), from torch-fidelity's InceptionV3. `real_cache` = (folder,
    name) keeps the real images' features in torch-fidelity's cache, for a sweep that compares
    many generated sets against one real set (the name must be unique to those images)."""
    kwargs = dict(
        input1=str(generated),
        input2=str(real),
        fid=True,
        isc=True,
        isc_splits=isc_splits,
        batch_size=batch_size,
        cuda=str(device).startswith("cuda"),
        verbose=False,
    )
    if real_cache is not None:
        kwargs.update(cache=True, cache_root=str(real_cache[0]), input2_cache_name=real_cache[1])
    if inception_weights is not None:
        path = Path(inception_weights)
        if not path.is_file():
            raise FileNotFoundError(f"inception_weights={path}: no such file")
        kwargs["feature_extractor_weights_path"] = str(path)
    try:
        metrics = torch_fidelity.calculate_metrics(**kwargs)
    except OSError as err:  # URLError and socket errors are OSErrors
        raise RuntimeError(
            f"torch-fidelity could not download its Inception weights ({err}); download "
            f"{INCEPTION_FILE} elsewhere and pass inception_weights=PATH"
        ) from None
    return {
        "fid": float(metrics[torch_fidelity.KEY_METRIC_FID]),
        "is_mean": float(metrics[torch_fidelity.KEY_METRIC_ISC_MEAN]),
        "is_std": float(metrics[torch_fidelity.KEY_METRIC_ISC_STD]),
    }


def weights_record(inception_weights: str | Path | None) -> dict:
    """Which Inception weights file a result came from (the protocol records it)."""
    if inception_weights is None:
        return {"file": f"torch-fidelity download ({INCEPTION_FILE})", "sha256": None}
    return {"file": str(inception_weights), "sha256": file_sha256(inception_weights)}
