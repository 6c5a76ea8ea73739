"""FID and IS with torch-fidelity, on folders of PNGs (Ramesh et al., 2021, sec. 3.1).

The paper compares generated and real images after a Gaussian blur of the same radius on
both sides (its Fig. 9: blur radius 0-8), so `blur_folder` writes a blurred copy of a folder
and the metrics are computed between two folders blurred alike.

Inception weights: torch-fidelity downloads its own (`weights-inception-2015-12-05-6726825d.pth`)
unless `inception_weights=PATH` names a local copy; `weights_record` says which file was
used (path and sha256). A failed download ends with one line naming that override.

The real side of FID can also be given as statistics (mu, sigma) computed earlier by
`inception_statistics` (`reference_stats.py`): `fid_and_is(..., reference=stats)` then runs
the same torch-fidelity functions on the generated images alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from PIL import Image, ImageFilter
from torch import Tensor
from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id

from dalle_lightning.checkpoints import file_sha256

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
EXTRACTOR = "inception-v3-compat"  # torch-fidelity's defaults for FID and IS
FID_LAYER, IS_LAYER = "2048", "logits_unbiased"


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
    real: str | Path | None,
    inception_weights: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    isc_splits: int = 10,
    real_cache: tuple[str | Path, str] | None = None,
    reference: dict | None = None,
) -> dict:
    """{"fid", "is_mean", "is_std"} of the images in folder `generated` against folder `real`
    or, when `real` is None, against `reference` = {"mu", "sigma"} of the real images (IS of
    the generated ones), from torch-fidelity's InceptionV3. `real_cache` = (folder, name)
    keeps the real images' features in torch-fidelity's cache, for a sweep that compares
    many generated sets against one real set (the name must be unique to those images)."""
    options = _options(inception_weights, device, batch_size, isc_splits=isc_splits)
    if real is None:
        if reference is None:
            raise ValueError("fid_and_is needs the real images' folder or their statistics")
        extractor = _extractor(options, [FID_LAYER, IS_LAYER])
        features = extract_featuresdict_from_input_id(
            1, extractor, input1=str(generated), **options
        )
        fid = fid_statistics_to_metric(
            fid_featuresdict_to_statistics(features, FID_LAYER), reference, verbose=False
        )
        metrics = {**fid, **isc_featuresdict_to_metric(features, IS_LAYER, **options)}
    else:
        kwargs = dict(input1=str(generated), input2=str(real), fid=True, isc=True, **options)
        if real_cache is not None:
            cache = dict(cache_root=str(real_cache[0]), input2_cache_name=real_cache[1])
            kwargs.update(cache=True, **cache)
        metrics = _downloading(lambda: torch_fidelity.calculate_metrics(**kwargs))
    return {
        "fid": float(metrics[torch_fidelity.KEY_METRIC_FID]),
        "is_mean": float(metrics[torch_fidelity.KEY_METRIC_ISC_MEAN]),
        "is_std": float(metrics[torch_fidelity.KEY_METRIC_ISC_STD]),
    }


def inception_statistics(
    folder: str | Path,
    inception_weights: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 64,
) -> dict:
    """{"mu", "sigma", "count"} of the Inception pool features of the images in `folder`:
    the statistics torch-fidelity computes for each side of FID."""
    options = _options(inception_weights, device, batch_size)
    extractor = _extractor(options, [FID_LAYER])
    features = extract_featuresdict_from_input_id(1, extractor, input1=str(folder), **options)
    stats = fid_featuresdict_to_statistics(features, FID_LAYER)
    return {**stats, "count": int(features[FID_LAYER].shape[0])}


def inception_sha256(inception_weights: str | Path | None) -> str:
    """sha256 of the Inception weights file a run uses: `inception_weights`, or torch-fidelity's
    downloaded copy in torch hub's cache (downloaded now if it is not there yet)."""
    if inception_weights is not None:
        return file_sha256(inception_weights)
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not path.is_file():
        _extractor(_options(None, "cpu", 1), [FID_LAYER])  # torch-fidelity downloads it
    return file_sha256(path)


def _options(weights: str | Path | None, device: str, batch_size: int, **more) -> dict:
    options = dict(
        batch_size=batch_size, cuda=str(device).startswith("cuda"), verbose=False, **more
    )
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"inception_weights={path}: no such file")
        options["feature_extractor_weights_path"] = str(path)
    return options


def _extractor(options: dict, layers: list[str]):
    return _downloading(lambda: create_feature_extractor(EXTRACTOR, layers, **options))


def _downloading(call):
    try:
        return call()
    except OSError as err:  # URLError and socket errors are OSErrors
        raise RuntimeError(
            f"torch-fidelity could not download its Inception weights ({err}); download "
            f"{INCEPTION_FILE} elsewhere and pass inception_weights=PATH"
        ) from None


def weights_record(inception_weights: str | Path | None) -> dict:
    """Which Inception weights file a result came from (the protocol records it)."""
    if inception_weights is None:
        return {"file": f"torch-fidelity download ({INCEPTION_FILE})", "sha256": None}
    return {"file": str(inception_weights), "sha256": file_sha256(inception_weights)}
