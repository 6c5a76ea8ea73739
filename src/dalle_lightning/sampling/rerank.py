"""CLIP reranking: score each candidate against its caption, keep the best of k (Ramesh et
al., 2021, sec. 2.3 and Fig. 9).

Rerankers share one interface, `score(images, captions) -> (N,) similarities` for N (image,
caption) pairs, images (N, 3, H, W) in [0, 1]; higher is better.

- `TrainedClip` (`reranker=trained`): the in-project CLIP of `python train.py model=clip`,
  from its checkpoint (default: the newest finished train_clip run). Cosine similarity.
- `OpenClip` (`reranker=open_clip`): a pretrained open_clip model (default ViT-B-32 with the
  OpenAI weights), from open_clip's own download or from a local file
  (`reranker.checkpoint=PATH`). Images go through the model's own preprocessing.

`best_of_k`: N = max(k) images are generated per caption once and scored; best-of-k for
every smaller k takes the best among the *first* k of the same pool, so the whole sweep over
rerank counts costs one generation of N, and best-of-k is nested: growing k can only raise
the chosen image's score.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor
from torchvision.transforms.functional import to_pil_image

from dalle_lightning.checkpoints import read_clip
from dalle_lightning.config import ConfigError, require
from dalle_lightning.models.clip import ClipConfig, ContrastiveModel
from dalle_lightning.runs import latest_checkpoint
from dalle_lightning.text.tokenizer import BPETokenizer

log = logging.getLogger(__name__)


class Reranker(Protocol):
    def score(self, images: Tensor, captions: Sequence[str]) -> Tensor: ...

    def describe(self) -> dict: ...


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TrainedClip:
    def __init__(
        self,
        ckpt_path: str | None = None,
        runs_dir: str = "logs",
        batch_size: int = 256,
        device: str = "auto",
    ):
        path = ckpt_path or latest_checkpoint(runs_dir, "train_clip")
        require(
            path is not None and Path(path).is_file(),
            "reranker.ckpt_path",
            ckpt_path,
            f"a CLIP checkpoint (none found under {runs_dir}/train_clip: run "
            "`python train.py model=clip` first, or use reranker=open_clip)",
        )
        saved = read_clip(path, "reranker.ckpt_path")
        self.path, self.batch_size, self.device = Path(path), batch_size, _device(device)
        self.model = ContrastiveModel(ClipConfig(**saved.config))
        self.model.load_state_dict(saved.state_dict, strict=True)
        self.model.eval().to(self.device)
        self.tokenizer = BPETokenizer.from_state(saved.tokenizer)
        self.data = saved.data_identity  # what it was trained on
        log.info("reranker: in-project CLIP %s", self.path)

    @torch.no_grad()
    def score(self, images: Tensor, captions: Sequence[str]) -> Tensor:
        size = self.model.config.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            raise ValueError(f"the CLIP was trained at {size} px, the images are {images.shape}")
        out = []
        for i in range(0, len(captions), self.batch_size):
            text = self.tokenizer.encode(captions[i : i + self.batch_size]).to(self.device)
            batch = images[i : i + self.batch_size].to(self.device, torch.float32)
            out.append(self.model.similarity(text, batch).cpu())
        return torch.cat(out)

    def describe(self) -> dict:
        return {"name": "trained", "ckpt_path": str(self.path), "trained_on": self.data}


class OpenClip:
    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str = "openai",
        checkpoint: str | None = None,
        batch_size: int = 64,
        device: str = "auto",
    ):
        import open_clip  # imported here: only this reranker needs it

        if checkpoint is not None:
            require(Path(checkpoint).is_file(), "reranker.checkpoint", checkpoint, "a file")
        source = checkpoint or pretrained
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=source
            )
        except (OSError, RuntimeError) as err:  # no network: HF hub / urllib errors
            if checkpoint is not None:
                raise ConfigError(
                    "reranker.checkpoint", checkpoint, f"an open_clip {model_name} file ({err})"
                ) from None
            raise RuntimeError(
                f"open_clip could not get the {model_name}/{pretrained} weights ({err}); "
                f"download them elsewhere and pass reranker.checkpoint=PATH"
            ) from None
        self.model_name, self.pretrained, self.checkpoint = model_name, pretrained, checkpoint
        self.batch_size, self.device = batch_size, _device(device)
        self.model = model.eval().to(self.device)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        log.info("reranker: open_clip %s (%s)", model_name, source)

    @torch.no_grad()
    def score(self, images: Tensor, captions: Sequence[str]) -> Tensor:
        out = []
        for i in range(0, len(captions), self.batch_size):
            chunk = images[i : i + self.batch_size].float().clamp(0, 1).cpu()
            pixels = torch.stack([self.preprocess(to_pil_image(im)) for im in chunk])
            image_emb = self.model.encode_image(pixels.to(self.device), normalize=True)
            text = self.tokenizer(list(captions[i : i + self.batch_size])).to(self.device)
            text_emb = self.model.encode_text(text, normalize=True)
            out.append((image_emb * text_emb).sum(-1).float().cpu())
        return torch.cat(out)

    def describe(self) -> dict:
        return {
            "name": "open_clip",
            "model_name": self.model_name,
            "weights": self.checkpoint or self.pretrained,
        }


def best_of_k(scores: Tensor, counts: Sequence[int]) -> dict[int, Tensor]:
    """scores (C, N): candidate j of caption i -> {k: (C,) index in [0, k) of the best of the
    first k candidates} for every k in `counts` (1 <= k <= N)."""
    n = scores.shape[1]
    for k in counts:
        require(isinstance(k, int) and 1 <= k <= n, "rerank_counts", list(counts), f"in [1, {n}]")
    return {k: scores[:, :k].argmax(1) for k in counts}
