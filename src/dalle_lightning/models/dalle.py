"""DALL-E as used after training: the prior, the dVAE that decodes its tokens, the tokenizer.

`DALLE.from_checkpoint(path)` rebuilds all three from a stage-2 training checkpoint alone
(it carries `prior_config`, `dvae_config`, the tokenizer and all weights), with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from dalle_lightning.checkpoint_file import read_checkpoint
from dalle_lightning.models.dvae import DVAE, DVAEConfig
from dalle_lightning.models.transformer import PriorConfig, PriorTransformer
from dalle_lightning.sampling.generate import generate_images
from dalle_lightning.text.tokenizer import BPETokenizer


class DALLE(nn.Module):
    def __init__(
        self,
        prior: PriorTransformer,
        dvae: DVAE,
        tokenizer: BPETokenizer | None,
        sampling: dict | None = None,
        caption_dropout: float = 0.0,
    ):
        """`sampling`: the settings it was trained for (model.sampling), the defaults of
        `evaluate.py`; `caption_dropout`: its share of blank captions in training (> 0: it
        can be sampled with classifier-free guidance)."""
        super().__init__()
        if prior.config.image_vocab != dvae.vocab_size or prior.config.grid_size != dvae.grid_size:
            raise ValueError(
                f"prior expects {prior.config.grid_size}^2 tokens from {prior.config.image_vocab}"
                f" codes, the dVAE makes {dvae.grid_size}^2 from {dvae.vocab_size}"
            )
        self.prior, self.dvae, self.tokenizer = prior, dvae, tokenizer
        self.sampling, self.caption_dropout = dict(sampling or {}), caption_dropout
        self.dvae.requires_grad_(False)  # frozen in stage 2 (paper sec. 2.2)

    def checkpoint_extras(self) -> dict:
        """What `from_checkpoint` needs besides the state_dict."""
        return {
            "prior_config": asdict(self.prior.config),
            "dvae_config": asdict(self.dvae.config),
            "tokenizer": self.tokenizer.state() if self.tokenizer is not None else None,
            "sampling": self.sampling,
            "caption_dropout": self.caption_dropout,
        }

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, map_location: str | torch.device = "cpu", trusted: bool = False
    ) -> DALLE:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"DALL-E checkpoint not found: {path}")
        ckpt = read_checkpoint(path, "ckpt_path", trusted, map_location=map_location)
        missing = [k for k in ("prior_config", "dvae_config", "tokenizer") if not ckpt.get(k)]
        if missing:
            raise RuntimeError(
                f"{path} is not a stage-2 checkpoint (no {', '.join(missing)}); "
                "train one with `python train.py model=dalle`"
            )
        prior = PriorTransformer(PriorConfig(**ckpt["prior_config"]))
        dvae = DVAE(DVAEConfig(**ckpt["dvae_config"]))
        hparams = ckpt.get("hyper_parameters") or {}  # what checkpoints before "sampling" hold
        model = cls(
            prior,
            dvae,
            BPETokenizer.from_state(ckpt["tokenizer"]),
            sampling=ckpt.get("sampling", hparams.get("sampling")),
            caption_dropout=ckpt.get("caption_dropout", hparams.get("caption_dropout", 0.0)),
        )
        state = {
            k.removeprefix("model."): v
            for k, v in ckpt["state_dict"].items()
            if k.startswith("model.")
        }
        model.load_state_dict(state, strict=True)
        return model.eval()

    def generate(self, captions: Sequence[str], num_images: int = 1, **sampling) -> Tensor:
        """(len(captions) * num_images, C, H, W) in [0, 1]; see `sampling.generate_images`."""
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer yet: it is trained on the captions at fit start")
        return generate_images(
            self.prior, self.dvae, self.tokenizer, captions, num_images, **sampling
        )
