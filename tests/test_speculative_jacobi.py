"""Speculative Jacobi decoding and prefix sharing: the decoder's window forward equals the
teacher-forced logits, and the codes it samples follow the exact sampling distribution."""

from __future__ import annotations

import dataclasses
import itertools
from types import SimpleNamespace

import pytest
import torch

from dalle_lightning.models.transformer import PriorConfig, PriorTransformer
from dalle_lightning.sampling.kv_decoder import KVDecoder
from dalle_lightning.sampling.sampler import (
    SamplingConfig,
    filter_logits,
    gumbel_max,
    sample_codes,
)
from dalle_lightning.sampling.speculative_jacobi import speculative_jacobi
from tests.test_transformer import GRID, T, inputs, tiny


@pytest.mark.parametrize("attention", ["full", "sparse"])
def test_windows_of_any_length_equal_the_forward(attention):
    """prefill, then windows of 1..5 slots (the sparse layers' masks cut through them) give
    the teacher-forced logits of every slot."""
    model = tiny(attention)
    text, codes = inputs(batch=2)
    with torch.no_grad():
        expected = model(text, codes).image_logits
        decoder = KVDecoder(model, batch=2)
        logits, p = [decoder.prefill(text)[:, None]], 1
        for length in itertools.cycle([3, 1, 5, 2, 4]):
            length = min(length, GRID * GRID - p)
            logits.append(decoder.window(codes[:, p - 1 : p - 1 + length]))
            p += length
            if p == GRID * GRID:
                break
    torch.testing.assert_close(torch.cat(logits, 1), expected, atol=1e-5, rtol=0)
    assert decoder.cache.length == T + GRID * GRID


def test_a_window_overwrites_the_slots_of_refused_guesses():
    """After a window of wrong guesses the cache is rewound; the next window rewrites those
    slots and the logits are those of the settled codes."""
    model = tiny("sparse")
    text, codes = inputs(batch=2)
    with torch.no_grad():
        expected = model(text, codes).image_logits
        decoder = KVDecoder(model, batch=2)
        decoder.prefill(text)
        decoder.window((codes[:, :4] + 1) % 24)  # four wrong inputs into slots 1..4
        decoder.cache.length = T + 1
        torch.testing.assert_close(
            decoder.window(codes[:, :6]), expected[:, 1:7], atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("attention", ["full", "sparse"])
def test_rows_at_different_slots_get_their_own_logits(attention):
    """One window with a start slot per row: row 0 inside the image, row 1 at its last two
    slots and two past the end (the cache's spare slots). Each live slot's logits are the
    teacher-forced ones; a decoder built without spare slots refuses the window by name."""
    model = tiny(attention)
    text, codes = inputs(batch=2)
    N = GRID * GRID
    with torch.no_grad():
        expected = model(text, codes).image_logits
        decoder = KVDecoder(model, batch=2, window=4)
        decoder.prefill(text)
        decoder.window(codes[:, : N - 1])  # every slot, both rows
        fed = torch.stack([codes[0, 1:5], torch.cat([codes[1, N - 3 : N - 1], codes[1, :2]])])
        logits = decoder.window(fed, torch.tensor([T + 2, T + N - 2]))
        torch.testing.assert_close(logits[0], expected[0, 2:6], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[1, :2], expected[1, N - 2 :], atol=1e-5, rtol=0)
        no_spare = KVDecoder(model, batch=2)
        no_spare.prefill(text)
        with pytest.raises(ValueError, match=r"KVDecoder\(window >= 4\)"):
            no_spare.window(fed, torch.tensor([T + 2, T + N - 2]))


@pytest.mark.parametrize("guided", [False, True])
def test_jacobi_logits_equal_teacher_forcing_on_its_codes(guided):
    """Every kept code was verified against the logits of its settled prefix."""
    model = tiny("sparse")
    text, _ = inputs(batch=3)
    sampling = SamplingConfig(
        temperature=0.7, top_p=0.95, cond_scale=2.0 if guided else 1.0, jacobi_window=4
    )
    g = torch.Generator().manual_seed(0)
    out = sample_codes(model, text, sampling, g, keep_logits=True)
    with torch.no_grad():
        expected = model(text, out.codes).image_logits
        if guided:
            blank = model(text.new_tensor(range(40, 40 + T)).expand(3, -1), out.codes)
            expected = blank.image_logits + 2.0 * (expected - blank.image_logits)
    torch.testing.assert_close(out.logits, expected, atol=1e-4, rtol=0)
    assert 1 <= out.forwards <= GRID * GRID - 1


def peaked_prior(seed: int) -> PriorTransformer:
    """A small prior with weights large enough that each code's distribution is far from
    uniform and depends on the codes before it (random init with std 0.02 is near uniform)."""
    torch.manual_seed(seed)
    config = PriorConfig(
        text_vocab=8, text_seq_len=2, image_vocab=2, grid_size=2, dim=16, depth=2, heads=2
    )
    model = PriorTransformer(config).eval()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(0, 0.6)
    return model


def exact_distribution(model: PriorTransformer, text: torch.Tensor, sampling) -> torch.Tensor:
    """(2**4,) probability of every code sequence of the 2 x 2 grid, from teacher forcing."""
    sequences = torch.tensor(list(itertools.product(range(2), repeat=4)))
    with torch.no_grad():
        logits = model(text.expand(len(sequences), -1), sequences).image_logits
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    log_p = logits.log_softmax(-1).gather(-1, sequences[..., None])[..., 0].sum(1)
    return log_p.exp()


def sampled_distribution(model, text, sampling, window: int, draws: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(16)
    forwards = 0
    for _ in range(draws // batch):
        windowed = dataclasses.replace(sampling, jacobi_window=window)
        out = sample_codes(model, text.expand(batch, -1), windowed, g)
        index = (out.codes * torch.tensor([8, 4, 2, 1])).sum(1)
        counts += torch.bincount(index, minlength=16)
        forwards += out.forwards
    return counts / counts.sum(), forwards / (draws // batch)


@pytest.mark.parametrize(
    "sampling",
    [SamplingConfig(), SamplingConfig(temperature=0.8, top_p=0.9)],
    ids=["plain", "temperature-top-p"],
)
def test_jacobi_samples_the_same_distribution_as_one_code_per_step(sampling):
    """Over all 16 code sequences of a 2 x 2 grid with 2 codes: draws with windows of 3 (2,000
    at batch 1; 10,000 in batches of 50 rows, each at its own pace) and 20,000 with one code
    per step are all close to the exact distribution in total variation (the sampling noise at
    these sizes is ~0.02, ~0.01 and ~0.005), while the distribution at 1.3x the temperature is
    > 0.08 away, so the test tells them apart. At batch 1 the windows save forwards."""
    model = peaked_prior(seed=2)
    text = torch.tensor([[1, 5]])
    exact = exact_distribution(model, text, sampling)
    tv = lambda a, b: 0.5 * (a - b).abs().sum().item()  # noqa: E731
    other = SamplingConfig(temperature=sampling.temperature * 1.3, top_p=sampling.top_p)
    assert tv(exact, exact_distribution(model, text, other)) > 0.08
    plain, plain_forwards = sampled_distribution(model, text, sampling, 0, 20_000, 500, 1)
    assert plain_forwards == 3 and tv(plain, exact) < 0.015
    jacobi, forwards = sampled_distribution(model, text, sampling, 3, 2_000, 1, 2)
    assert tv(jacobi, exact) < 0.04 and forwards < 2.0
    jacobi, forwards = sampled_distribution(model, text, sampling, 3, 10_000, 50, 3)
    assert tv(jacobi, exact) < 0.025 and forwards <= 3


def test_each_row_moves_at_its_own_pace():
    """Row 0's p is one code, so it keeps a uniform guess 1 time in 4 and settles little per
    forward; row 1's p is uniform, so it keeps every guess. Row 1's windows still start W codes
    apart (it is not held back by row 0), then stay past the image's end, and every code it was
    fed is the one it ends with: what it drew beyond its settled codes (q = p) was kept."""
    V, N, window, T = 4, 16, 4, 2
    decoder = SimpleNamespace(
        config=SimpleNamespace(image_seq_len=N, text_seq_len=T), cache=SimpleNamespace(length=3)
    )
    row_logits = torch.tensor([[0.0, -float("inf"), -float("inf"), -float("inf")], [0.0] * V])
    fed: list[tuple[torch.Tensor, int]] = []  # (inputs, row 1's start) of each forward

    def logits_of(window_inputs: torch.Tensor, starts: torch.Tensor | int) -> torch.Tensor:
        fed.append((window_inputs.clone(), starts if isinstance(starts, int) else int(starts[1])))
        return row_logits[:, None].expand(2, window_inputs.shape[1], V)

    g = torch.Generator().manual_seed(0)
    out = speculative_jacobi(
        decoder,
        row_logits,
        logits_of,
        lambda logits: logits.softmax(-1),
        lambda probs: gumbel_max(probs.log(), g),
        window,
        g,
    )
    assert (out.codes[0] == 0).all()
    assert out.forwards == len(fed) > (N - 1) / window + 1  # row 0 needs more forwards
    assert [start for _, start in fed] == [min(T + 1 + k * window, T + N) for k in range(len(fed))]
    for window_inputs, start in fed:
        position = start - T - 1  # of window_inputs[1, 0]
        inside = window_inputs[1, : max(0, N - position)]
        assert inside.tolist() == out.codes[1, position : position + len(inside)].tolist()


@pytest.mark.parametrize("window", [0, 4])
def test_progress_reports_every_code_and_changes_no_draw(window):
    model, (text, _) = tiny().eval(), inputs(2)
    sampling = SamplingConfig(jacobi_window=window)
    seen: list[tuple[int, int]] = []
    with_progress = sample_codes(
        model, text, sampling, torch.Generator().manual_seed(3), progress=lambda *a: seen.append(a)
    ).codes
    plain = sample_codes(model, text, sampling, torch.Generator().manual_seed(3)).codes
    assert torch.equal(with_progress, plain)
    n = GRID * GRID
    assert seen == ([(p, n) for p in range(1, n + 1)] if window == 0 else [(n, n)])
