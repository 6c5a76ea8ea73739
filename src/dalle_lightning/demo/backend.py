"""The demo's work, without the page: draw candidates, rank them, check them, save them.

`DemoBackend.generate` draws a request's candidates exactly as `evaluate.py task=generate`
does (one caption, `seed`, the same sampling settings and `sampling.batch_size`: the same
images), scores them with the reranker, sorts them best first, runs the shapes attribute
checker when the caption is in the shapes grammar, and writes each candidate as a PNG whose
text chunks carry the caption, seed, settings, score and the `evaluate.py` command that
redraws it. Every request is logged to <run dir>/generations/ and counted in metrics.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from dalle_lightning.data.shapes import parse_caption
from dalle_lightning.demo.request import DemoRequest
from dalle_lightning.evaluation.attribute_checker import check_attributes
from dalle_lightning.evaluation.generate import slug
from dalle_lightning.models.dalle import DALLE
from dalle_lightning.runs import write_metrics
from dalle_lightning.sampling.rerank import Reranker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    rank: int  # 1 = the reranker's best
    index: int  # position among the drawn images (= its place in task=generate's grid)
    score: float
    verdict: str  # the attribute checker's, "" when it did not run
    png: Path


def to_uint8(image: Tensor) -> Tensor:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8, rounded as `torchvision.utils.save_image`
    rounds, so that a candidate's PNG equals its tile of task=generate's grid."""
    return image.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8)


def verdict(image: Tensor, record: dict | None) -> str:
    """The shapes attribute checker on `image` against a caption's record (`parse_caption`);
    "" without one (a caption outside the shapes grammar)."""
    if record is None:
        return ""
    result = check_attributes(image, record)
    checked = ", ".join(f"{kind} {result.passed[kind]}/{n}" for kind, n in result.checked.items())
    if result.match:
        return f"matches the caption ({checked})"
    return "does not match: " + "; ".join(result.failures)


class DemoBackend:
    def __init__(
        self,
        model: DALLE,
        ckpt_path: str,
        reranker: Reranker,
        out_dir: Path,
        batch_size: int = 64,
        attribute_check: bool = True,
    ):
        self.model, self.ckpt_path, self.reranker = model, ckpt_path, reranker
        self.out_dir, self.batch_size, self.attribute_check = out_dir, batch_size, attribute_check
        self.started = time.monotonic()
        self.counts = {"requests": 0, "rejected": 0, "images": 0, "seconds_generating": 0.0}
        self._lock = threading.Lock()  # counters and metrics.json, across queue workers

    def reproduce(self, request: DemoRequest) -> list[str]:
        """The evaluate.py overrides that draw the same images (as a grid, in drawn order)."""
        s = request.sampling
        top_k = s.top_k if s.top_k is not None else self.model.prior.config.image_vocab
        return [
            "task=generate",
            f"ckpt_path={self.ckpt_path}",
            "prompts=" + json.dumps([request.caption], ensure_ascii=False),
            f"num_images={request.candidates}",
            f"seed={request.seed}",
            f"sampling.temperature={s.temperature}",
            f"sampling.top_k={top_k}",  # all codes: the same as no top-k
            f"sampling.top_p={s.top_p if s.top_p is not None else 1.0}",
            f"sampling.cond_scale={s.cond_scale}",
            f"sampling.jacobi_window={s.jacobi_window}",
            f"sampling.batch_size={self.batch_size}",
        ]

    def generate(
        self, request: DemoRequest, progress: Callable[[float], None] | None = None
    ) -> list[Candidate]:
        """The request's candidates, best first, each saved as a PNG with its metadata."""
        started = time.monotonic()
        images = self.model.generate(
            [request.caption],
            request.candidates,
            seed=request.seed,
            sampling=request.sampling,
            batch_size=self.batch_size,
            progress=progress,
        )
        scores = self.reranker.score(images, [request.caption] * len(images)).float().cpu()
        order = sorted(range(len(images)), key=lambda i: (-scores[i].item(), i))
        with self._lock:
            number = self.counts["requests"]
            self.counts["requests"] += 1
        folder = self.out_dir / "generations" / f"{number:04d}_{slug(request.caption)}"
        folder.mkdir(parents=True, exist_ok=True)
        overrides = self.reproduce(request)
        settings = {
            "caption": request.caption,
            "seed": request.seed,
            "num_images": request.candidates,
            "sampling": dataclasses.asdict(request.sampling),
            "batch_size": self.batch_size,
            "checkpoint": self.ckpt_path,
            "reranker": self.reranker.describe(),
        }
        record = parse_caption(request.caption) if self.attribute_check else None
        candidates = []
        for rank, index in enumerate(order, start=1):
            image = images[index]
            said = verdict(image, record)
            score = round(scores[index].item(), 4)
            info = PngInfo()
            meta = {
                **settings,
                "rank": rank,
                "index": index,
                "score": score,
                "attributes": said,
                "evaluate_overrides": overrides,
                "evaluate_command": "python evaluate.py " + shlex.join(overrides),
            }
            for key, value in meta.items():
                text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
                info.add_itxt(key, text)
            path = folder / f"rank{rank:02d}_image{index:02d}_seed{request.seed}.png"
            Image.fromarray(to_uint8(image).numpy()).save(path, pnginfo=info)
            candidates.append(Candidate(rank, index, score, said, path))
        seconds = time.monotonic() - started
        (folder / "request.json").write_text(
            json.dumps(
                {
                    **settings,
                    "seconds": round(seconds, 2),
                    "evaluate_overrides": overrides,
                    "ranked": [dataclasses.asdict(c) | {"png": c.png.name} for c in candidates],
                },
                indent=2,
                ensure_ascii=False,
            )
            + "\n"
        )
        log.info(
            "%d candidates for %r in %.1f s, best score %.3f: %s",
            len(candidates),
            request.caption[:80],
            seconds,
            candidates[0].score,
            folder,
        )
        with self._lock:
            self.counts["images"] += len(candidates)
            self.counts["seconds_generating"] += seconds
            self._write_metrics()
        return candidates

    def rejected(self, message: str) -> None:
        log.info("request refused: %s", message)
        with self._lock:
            self.counts["rejected"] += 1
            self._write_metrics()

    def _write_metrics(self) -> None:
        c = self.counts
        per_image = c["seconds_generating"] / c["images"] if c["images"] else None
        write_metrics(
            self.out_dir / "metrics.json",
            {
                "task_name": "demo",
                "run_dir": str(self.out_dir),
                "wall_time_s": round(time.monotonic() - self.started, 1),
                "checkpoints": {"evaluated": self.ckpt_path},
                "reranker": self.reranker.describe(),
                "metrics": {
                    "requests_served": c["requests"],
                    "requests_refused": c["rejected"],
                    "images": c["images"],
                    "seconds_per_image": round(per_image, 4) if per_image else None,
                },
            },
        )
