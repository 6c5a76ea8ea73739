"""DALL-E as used after training: the prior, the dVAE that decodes its tokens, the tokenizer.

`DALLE.from_checkpoint(path)` rebuilds all three from a stage-2 training checkpoint alone
(`checkpoints.read_dalle`: the prior's and the dVAE's configs and weights, the tokenizer, the
sampling settings it was trained for), with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from dalle_lightning.checkpoints import read_dalle
from dalle_lightning.config import ConfigError
from dalle_lightning.models.dvae import DVAE, DVAEConfig
from dalle_lightning.models.transformer import PriorConfig, PriorTransformer
from dalle_lightning.sampling.sampler import SamplingConfig, generate_images
from dalle_lightning.text.tokenizer import BPETokenizer


class DALLE(nn.Module):
    def __init__(
        self,
        prior: PriorTransformer,
        dvae: DVAE,
        tokenizer: BPETokenizer | None,
        sampling: SamplingConfig = SamplingConfig(),
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
        self.sampling, self.caption_dropout = sampling, caption_dropout
        self.dvae.requires_grad_(False)  # frozen in stage 2 (paper sec. 2.2)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        map_location: str | torch.device = "cpu",
        trusted: bool = False,
        field: str = "ckpt_path",
    ) -> DALLE:
        """A stage-2 training checkpoint; a file that is not one is a `ConfigError` on `field`."""
        saved = read_dalle(path, field, trusted, map_location)
        try:
            prior = PriorTransformer(PriorConfig(**saved.prior_config))
            dvae = DVAE(DVAEConfig(**saved.dvae_config))
            sampling = SamplingConfig(**(saved.sampling or {}))
        except ConfigError as err:
            raise ConfigError(
                field, str(path), f"a checkpoint with valid configs ({err})"
            ) from None
        tokenizer = BPETokenizer.from_state(saved.tokenizer)
        model = cls(prior, dvae, tokenizer, sampling, saved.caption_dropout)
        model.load_state_dict(saved.state_dict, strict=True)
        return model.eval()

    def generate(
        self,
        captions: Sequence[str],
        num_images: int = 1,
        seed: int = 0,
        sampling: SamplingConfig = SamplingConfig(),
        batch_size: int = 64,
        progress: Callable[[float], None] | None = None,
    ) -> Tensor:
        """(len(captions) * num_images, C, H, W) in [0, 1]; `sampling` defaults to the plain
        sampler (pass `model.sampling` for the settings it was trained for); `progress`
        (fraction of codes drawn) as in `generate_images`."""
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer yet: it is trained on the captions at fit start")
        return generate_images(
            self.prior,
            self.dvae,
            self.tokenizer,
            captions,
            num_images,
            sampling,
            seed,
            batch_size,
            progress,
        )
