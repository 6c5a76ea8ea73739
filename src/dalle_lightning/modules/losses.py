"""Training objectives: the dVAE terms (Ramesh et al., 2021, sec. 2.1, A.3) and the prior's
cross-entropy (sec. 2.2), with their typed configs `DVAELoss` and `PriorLoss` (flat keys of
conf/model/dvae.yaml and conf/model/dalle.yaml).

Shape legend: B batch, C channels, H x W pixels, K codebook size, h x w code grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dalle_lightning.config import require_choice, require_float
from dalle_lightning.models.dvae import map_pixels

RECON_LOSSES = ("logit_laplace", "mse")


@dataclass(frozen=True)
class DVAELoss:
    """The dVAE's objective per image, [NLL(x | z) + beta * KL(q_phi(z|x) || uniform)] / (C H W)
    (paper: logit-Laplace NLL, beta 6.6 after its warm-up), plus `usage_weight` * the
    code-usage KL (not in the paper; `code_usage_kl`). `recon_loss=mse` swaps in a Gaussian
    NLL with a fixed `mse_sigma`."""

    beta: float = 6.6
    usage_weight: float = 0.0
    recon_loss: str = "logit_laplace"
    mse_sigma: float = 0.1

    def __post_init__(self) -> None:
        require_float("beta", self.beta, 0.0)
        require_float("usage_weight", self.usage_weight, 0.0)
        require_choice("recon_loss", self.recon_loss, RECON_LOSSES)
        require_float("mse_sigma", self.mse_sigma, 1e-6)


@dataclass(frozen=True)
class PriorLoss:
    """The prior's objective: text and image cross-entropy weighted `text_loss_weight` : 1 -
    `text_loss_weight` (paper: 1/8 : 7/8), on captions of which a `caption_dropout` share is
    blanked (not in the paper: it teaches the unconditional prior that guidance needs)."""

    text_loss_weight: float = 1 / 8
    caption_dropout: float = 0.0

    def __post_init__(self) -> None:
        require_float("text_loss_weight", self.text_loss_weight, 0.0, 1.0)
        require_float("caption_dropout", self.caption_dropout, 0.0, 1.0)


def logit_laplace_nll(stats: Tensor, images: Tensor) -> Tensor:
    """-ln p(x | mu, b) per image, summed over C x H x W: (B,).

    logit-Laplace density on x in (0, 1) (paper eq. in sec. A.3):
        f(x | mu, b) = 1 / (2 b x (1 - x)) * exp(-|logit(x) - mu| / b)
    evaluated on the mapped target x = (1 - 2 eps) x + eps, with stats = [mu | ln b] on dim 1.
    """
    channels = images.shape[1]
    mu, log_b = stats[:, :channels], stats[:, channels:]
    x = map_pixels(images)
    logit_x = torch.log(x) - torch.log1p(-x)
    nll = (
        math.log(2)
        + log_b
        + torch.log(x)
        + torch.log1p(-x)
        + (logit_x - mu).abs() * torch.exp(-log_b)
    )
    return nll.flatten(1).sum(1)


def mse_nll(reconstruction: Tensor, images: Tensor, sigma: float = 0.1) -> Tensor:
    """Gaussian -ln p(x | x_hat, sigma) per image without its constant, summed over C x H x W: (B,).

    The `mse` baseline the paper compares the logit-Laplace likelihood against (sec. A.3);
    the fixed sigma sets how the squared error is weighed against beta * KL.
    """
    return (reconstruction - images).pow(2).flatten(1).sum(1) / (2 * sigma**2)


def kl_to_uniform(logits: Tensor) -> Tensor:
    """KL(q_phi(z|x) || uniform over K codes), summed over the h x w grid: (B,).

    KL = sum_k q_k (ln q_k + ln K) at each position.
    """
    log_q = F.log_softmax(logits, dim=1)
    kl = (log_q.exp() * log_q).sum(1) + math.log(logits.shape[1])  # (B, h, w)
    return kl.flatten(1).sum(1)


def code_usage_kl(logits: Tensor) -> Tensor:
    """KL(q_bar || uniform) of the batch's average posterior q_bar = mean over images and
    grid positions of q_phi(z|x): a scalar in [0, ln K], 0 when all K codes are used equally.

    Not in the paper. The paper's KL term is per position and pulls every position's posterior
    towards uniform; this one penalises only a batch that uses few codes, which counters
    codebook collapse without making each position's code uncertain.
    """
    q_bar = F.softmax(logits.float(), dim=1).mean(dim=(0, 2, 3))
    return math.log(logits.shape[1]) + (q_bar * q_bar.clamp_min(1e-12).log()).sum()


def prior_loss(
    text_logits: Tensor, image_logits: Tensor, text: Tensor, codes: Tensor, text_weight: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(total, text, image) cross-entropy of the prior (paper sec. 2.2, B.2).

    Text slot j predicts text id j + 1 and image slot p predicts code p; text and image are
    each averaged over their own tokens, then weighted text_weight : 1 - text_weight
    (paper: 1/8 : 7/8). Per-position pad ids are ordinary targets.
    """
    text_loss = F.cross_entropy(text_logits[:, :-1].flatten(0, 1).float(), text[:, 1:].flatten())
    image_loss = F.cross_entropy(image_logits.flatten(0, 1).float(), codes.flatten())
    return text_weight * text_loss + (1 - text_weight) * image_loss, text_loss, image_loss
