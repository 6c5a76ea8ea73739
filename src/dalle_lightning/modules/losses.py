"""dVAE objective terms (Ramesh et al., 2021, sec. 2.1 and A.3).

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
