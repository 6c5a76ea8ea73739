"""`ProtocolConfig`: what an evaluation measures (conf/evaluate.yaml's top-level keys).

Kept apart from `rerank_metrics.py` (torch-fidelity, the datamodules, Lightning) so that
evaluate.py checks it before importing any of them (`preflight.check_evaluate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dalle_lightning.config import require, require_int


@dataclass(frozen=True)
class ProtocolConfig:
    """What an evaluation measures: the top-level keys of conf/evaluate.yaml, with per-dataset
    defaults for `splits` and `num_captions` in conf/protocol/<dataset>.yaml."""

    splits: tuple[str, ...] = ("test",)
    num_captions: int | None = None  # distinct captions per split; null: all of them
    rerank_counts: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # best-of-k (paper: up to 512)
    blur_radii: tuple[int | float, ...] = (0, 1, 2, 4, 8)  # Gaussian blur, real and generated alike
    fidelity: bool = True  # false: CLIP score and attribute accuracy only (no FID/IS)
    inception_weights: str | None = None  # a local torch-fidelity Inception file
    isc_splits: int = 10  # Inception Score splits (fewer if there are fewer images)
    fid_reference: str | None = None  # reference statistics instead of the real images

    def __post_init__(self) -> None:
        counts, radii, splits = list(self.rerank_counts), list(self.blur_radii), list(self.splits)
        require(
            counts and all(isinstance(k, int) and k >= 1 for k in counts),
            "rerank_counts",
            counts,
            "a non-empty list of integers >= 1, e.g. [1,2,4,8,16]",
        )
        require(
            radii and all(isinstance(r, (int, float)) and r >= 0 for r in radii),
            "blur_radii",
            radii,
            "a non-empty list of numbers >= 0, e.g. [0,1,2,4,8]",
        )
        if self.num_captions is not None:
            require_int("num_captions", self.num_captions, 2)  # FID needs two images
        require(
            len(splits) > 0 and all(isinstance(s, str) for s in splits),
            "splits",
            splits,
            "a non-empty list of split names",
        )
        require_int("isc_splits", self.isc_splits, 1)
        if self.inception_weights is not None:
            require(
                Path(self.inception_weights).is_file(),
                "inception_weights",
                self.inception_weights,
                "an existing torch-fidelity Inception weights file (or null: torch-fidelity "
                "downloads its own)",
            )
        if self.fid_reference is not None:
            require(
                Path(self.fid_reference).is_dir(),
                "fid_reference",
                self.fid_reference,
                "a folder written by `python -m dalle_lightning.evaluation.reference_stats`",
            )
        for name, value in (("splits", splits), ("rerank_counts", counts), ("blur_radii", radii)):
            object.__setattr__(self, name, tuple(value))
