"""Training objectives: the dVAE terms (Ramesh et al., 2021, sec. 2.1, A.3) and the prior's
cross-entropy (sec. 2.2).

Shape legend: B batch, C channels, H x W pixels, K codebook size, h x w code grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dalle_lightning.models.dvae import map_pixels


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
