"""The dVAE objective terms against direct formulas, and the schedules at known steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from dalle_lightning.models.dvae import DVAEConfig
from dalle_lightning.modules.dvae_module import DVAEModule
from dalle_lightning.modules.losses import (
    DVAELoss,
    code_usage_kl,
    kl_to_uniform,
    logit_laplace_nll,
    mse_nll,
)
from dalle_lightning.modules.schedules import DVAESchedule, cosine_anneal, linear_warmup

NET = DVAEConfig(image_size=32, vocab_size=64, n_hid=16, n_init=8, group_count=3, n_blk_per_group=1)


def test_logit_laplace_nll_matches_the_density_formula():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    stats = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    mu, b = stats[:, :3], stats[:, 3:].exp()
    x = 0.8 * images + 0.1  # pixel mapping with eps = 0.1
    # f(x | mu, b) = 1 / (2 b x (1 - x)) exp(-|logit(x) - mu| / b)   (paper sec. A.3)
    density = torch.exp(-(torch.logit(x) - mu).abs() / b) / (2 * b * x * (1 - x))
    expected = -density.log().flatten(1).sum(1)
    assert torch.allclose(logit_laplace_nll(stats, images), expected, rtol=1e-10)


def test_logit_laplace_density_integrates_to_one():
    mu, log_b = 0.3, math.log(0.7)
    x = torch.linspace(1e-6, 1 - 1e-6, 2_000_001, dtype=torch.float64)
    stats = (
        torch.tensor([mu, log_b], dtype=torch.float64).view(1, 2, 1, 1).expand(x.numel(), 2, 1, 1)
    )
    images = ((x - 0.1) / 0.8).view(-1, 1, 1, 1)  # so that the mapped pixel is x
    density = torch.exp(-logit_laplace_nll(stats, images))
    assert torch.trapezoid(density, x).item() == pytest.approx(1.0, abs=1e-3)


def test_kl_to_uniform_matches_torch_distributions():
    torch.manual_seed(0)
    logits = torch.randn(2, 16, 3, 3)
    q = Categorical(logits=logits.permute(0, 2, 3, 1))
    uniform = Categorical(logits=torch.zeros(2, 3, 3, 16))
    expected = kl_divergence(q, uniform).flatten(1).sum(1)
    assert torch.allclose(kl_to_uniform(logits), expected, atol=1e-5)
    assert torch.allclose(kl_to_uniform(torch.zeros(1, 16, 2, 2)), torch.zeros(1), atol=1e-5)


def test_mse_nll_is_scaled_squared_error():
    a, b = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)
    assert mse_nll(a, b, sigma=0.5).item() == pytest.approx(12 * 0.25 / 0.5)


def test_cosine_anneal_at_known_steps():
    assert cosine_anneal(0, 1.0, 1 / 16, 100) == 1.0
    assert cosine_anneal(50, 1.0, 1 / 16, 100) == pytest.approx((1 + 1 / 16) / 2)
    assert cosine_anneal(25, 0.0, 6.6, 100) == pytest.approx(6.6 * (1 - math.cos(math.pi / 4)) / 2)
    assert cosine_anneal(100, 0.0, 6.6, 100) == pytest.approx(6.6)
    assert cosine_anneal(10_000, 0.0, 6.6, 100) == pytest.approx(6.6)
    assert cosine_anneal(5, 2.0, 3.0, 0) == 3.0


def test_linear_warmup_at_known_steps():
    assert [linear_warmup(s, 4) for s in (0, 1, 3, 4, 100)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert linear_warmup(0, 0) == 1.0  # no warm-up


@pytest.mark.parametrize("warmup", [0, 10])
def test_dvae_learning_rate_warms_up_then_follows_the_cosine(warmup):
    lr, ratio, decay = 3e-3, 0.01, 100
    module = DVAEModule(
        NET,
        schedule=DVAESchedule(lr_final_ratio=ratio, lr_decay_steps=decay, lr_warmup_steps=warmup),
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr),
    )
    module.trainer = type("T", (), {"model": module, "max_steps": decay})()
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(decay + 1):
        seen.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    cosine = [lr * cosine_anneal(s, 1.0, ratio, decay) for s in range(decay + 1)]
    for step in (0, 4, 9):
        expected = cosine[step] * ((step + 1) / warmup if warmup else 1.0)
        assert seen[step] == pytest.approx(expected), step
    assert seen[10:] == pytest.approx(cosine[10:])  # after the warm-up: the paper's cosine
    assert seen[0] == pytest.approx(lr / 10 if warmup else lr)


def test_dvae_schedules_follow_the_paper_shape():
    schedule = DVAESchedule(kl_warmup_steps=5000, temp_anneal_steps=150_000)
    assert schedule.beta(0, 6.6) == 0.0
    assert schedule.beta(2500, 6.6) == pytest.approx(3.3)
    assert schedule.beta(5000, 6.6) == pytest.approx(6.6)
    assert schedule.tau(0) == 1.0
    assert schedule.tau(75_000) == pytest.approx(0.53125)
    assert schedule.tau(10**7) == pytest.approx(1 / 16)


def test_decoder_only_phase_starts_at_its_step():
    schedule = DVAESchedule(decoder_only_from=7)
    assert [schedule.decoder_only(s) for s in range(10)] == [False] * 7 + [True] * 3
    assert not any(DVAESchedule().decoder_only(s) for s in range(10))  # null: never


def test_dvae_learning_rate_restarts_for_the_decoder_only_phase():
    """With decoder_only_from inside the run, the cosine ends there, and the phase has its own
    cosine from decoder_only_lr_ratio of the initial rate over the steps left."""
    lr, ratio, steps, start = 3e-3, 0.01, 100, 60
    schedule = DVAESchedule(
        lr_final_ratio=ratio, decoder_only_from=start, decoder_only_lr_ratio=0.5
    )
    module = DVAEModule(NET, schedule=schedule, optimizer=lambda p: torch.optim.AdamW(p, lr=lr))
    module.trainer = type("T", (), {"model": module, "max_steps": steps})()
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(steps):
        seen.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    first = [lr * cosine_anneal(s, 1.0, ratio, start) for s in range(start)]
    second = [lr * 0.5 * cosine_anneal(s, 1.0, ratio, steps - start) for s in range(steps - start)]
    assert seen == pytest.approx(first + second)
    assert seen[start - 1] == pytest.approx(lr * ratio, rel=0.1)  # decayed, then
    assert seen[start] == pytest.approx(lr / 2)  # the phase starts afresh


def test_decoder_step_fits_the_decoder_to_the_hard_codes():
    """The decoder-only step's loss is validation's reconstruction term (argmax codes), and
    only the decoder gets gradients."""
    torch.manual_seed(0)
    module = DVAEModule(NET, DVAELoss(recon_loss="mse"), DVAESchedule(decoder_only_from=1))
    images = torch.rand(2, 3, 32, 32)
    loss = module._decoder_step(images)
    logits = module.net.logits(images)
    nll, _ = module._terms(module._decode_codes(logits.argmax(1), logits.dtype), logits, images)
    assert torch.allclose(loss, nll.mean())
    loss.backward()
    encoder = [p.grad for p in module.net.encoder.parameters()]
    decoder = [p.grad for p in module.net.decoder.parameters()]
    assert all(g is None for g in encoder)
    assert all(g is not None for g in decoder) and any(g.abs().sum() > 0 for g in decoder)


def test_training_loss_is_normalised_by_subpixels():
    torch.manual_seed(0)
    module = DVAEModule(NET, DVAELoss(beta=6.6), DVAESchedule(kl_warmup_steps=0))
    images = torch.rand(2, 3, 32, 32)
    out = module.net(images, tau=1.0)
    nll, kl = module._terms(out.stats, out.logits, images)
    raw = (logit_laplace_nll(out.stats, images) + 6.6 * kl_to_uniform(out.logits)) / (3 * 32 * 32)
    assert torch.allclose(nll + 6.6 * kl, raw, atol=1e-5)


def test_code_usage_kl_is_zero_for_even_use_and_ln_k_for_one_code():
    K = 16
    even = torch.zeros(2, K, 4, 4)  # every position uniform: the average is uniform
    assert code_usage_kl(even).item() == pytest.approx(0.0, abs=1e-6)
    one_code = torch.full((2, K, 4, 4), -1e4)
    one_code[:, 3] = 0.0
    assert code_usage_kl(one_code).item() == pytest.approx(math.log(K), rel=1e-5)
    # confident positions that together use every code equally cost nothing
    spread = torch.full((1, K, 4, 4), -1e4)
    spread.view(1, K, 16)[0, torch.arange(16), torch.arange(16)] = 0.0
    assert code_usage_kl(spread).item() == pytest.approx(0.0, abs=1e-5)
