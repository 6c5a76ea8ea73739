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

import torch
import torch_fidelity
from PIL import Image, ImageFilter
from torch import Tensor

from dalle_lightning.data.token_cache import file_sha256

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def save_images(images: Tensor, folder: str | Path, start: int = 0) -> list[Path]:
    """(N, 3, H, W) in [0, 1] -> <folder>/<index:06d>.png (8-bit, lossless), numbered from start."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    paths = []
    for i, image in enumerate(pixels, start=start):
        path = folder / f"{i:06d}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    return paths


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
) -> dict:
    """{"fid", "is_mean", "is_std"} of the images in folder `generated` against folder `real`
    (IS of the generated ones), from torch-fidelity's InceptionV3."""
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
