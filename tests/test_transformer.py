"""The prior: causality, cached == uncached generation, SDPA == FlexAttention, heads, sizes."""

from __future__ import annotations

import warnings
from dataclasses import asdict

import pytest
import torch

from dalle_lightning.config import ConfigError
from dalle_lightning.models.transformer import PriorConfig, PriorTransformer
from dalle_lightning.modules.losses import prior_loss
from dalle_lightning.sampling.kv_decoder import KVDecoder
from dalle_lightning.sampling.sampler import (
    SamplingConfig,
    blank_text,
    filter_logits,
    gumbel_max,
    resolve_sampling,
    sample_codes,
)

T, GRID, TEXT_VOCAB, IMAGE_VOCAB = 6, 4, 40, 24


def tiny(attention: str = "sparse", backend: str = "sdpa", depth: int = 4) -> PriorTransformer:
    torch.manual_seed(0)
    config = PriorConfig(
        text_vocab=TEXT_VOCAB,
        text_seq_len=T,
        image_vocab=IMAGE_VOCAB,
        grid_size=GRID,
        dim=32,
        depth=depth,
        heads=4,
        attention=attention,
        conv_kernel=3,
        backend=backend,
    )
    return PriorTransformer(config).eval()


def inputs(batch: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, TEXT_VOCAB + T, (batch, T), generator=g)
    codes = torch.randint(0, IMAGE_VOCAB, (batch, GRID * GRID), generator=g)
    return text, codes


def test_output_heads_predict_text_ids_on_text_and_codes_on_image():
    model = tiny()
    out = model(*inputs())
    assert out.text_logits.shape == (3, T, TEXT_VOCAB + T)  # text ids and pad ids
    assert out.image_logits.shape == (3, GRID * GRID, IMAGE_VOCAB)


@pytest.mark.parametrize("attention", ["full", "sparse"])
def test_changing_a_later_token_never_changes_earlier_logits(attention):
    model = tiny(attention)
    text, codes = inputs()
    base = model(text, codes)
    # image code k is the input of image slot k + 1: slots <= k must not move
    for k in (0, 5, GRID * GRID - 2):
        changed = codes.clone()
        changed[:, k] = (changed[:, k] + 1) % IMAGE_VOCAB
        out = model(text, changed)
        torch.testing.assert_close(out.image_logits[:, : k + 1], base.image_logits[:, : k + 1])
        torch.testing.assert_close(out.text_logits, base.text_logits)
        assert not torch.allclose(out.image_logits[:, k + 1 :], base.image_logits[:, k + 1 :])
    # text token j: text slots < j unchanged
    changed = text.clone()
    changed[:, 3] = (changed[:, 3] + 1) % TEXT_VOCAB
    out = model(changed, codes)
    torch.testing.assert_close(out.text_logits[:, :3], base.text_logits[:, :3])
    assert not torch.allclose(out.image_logits, base.image_logits)  # the image sees all text


def cached_and_uncached(model, text, seed: int, **sampling):
    """The same seeded sampling run with and without the key/value cache, logits kept."""
    return [
        sample_codes(
            model,
            text,
            SamplingConfig(**sampling),
            torch.Generator().manual_seed(seed),
            use_cache=use_cache,
            keep_logits=True,
        )
        for use_cache in (True, False)
    ]


@pytest.mark.parametrize("attention", ["full", "sparse"])
def test_cached_and_uncached_sampling_give_equal_logits(attention):
    model = tiny(attention)
    text, _ = inputs(batch=2)
    runs = cached_and_uncached(model, text, seed=3, top_k=10)
    assert torch.equal(runs[0].codes, runs[1].codes)
    torch.testing.assert_close(runs[0].logits, runs[1].logits, atol=1e-5, rtol=0)
    # and both equal teacher forcing on the sampled codes
    torch.testing.assert_close(
        model(text, runs[0].codes).image_logits, runs[0].logits, atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("attention", ["full", "sparse"])
def test_prefill_and_steps_equal_the_forward_and_leave_the_model_unhooked(attention):
    """The decoder's prefill is the prior's own forward over [text | start-of-image] (its
    hooks copy keys and values into the cache); each step equals the teacher-forced logits."""
    model = tiny(attention)
    text, codes = inputs(batch=2)
    with torch.no_grad():
        expected = model(text, codes).image_logits
        decoder = KVDecoder(model, batch=2)
        logits = [decoder.prefill(text)]
        logits += [decoder.step(codes[:, p - 1]) for p in range(1, GRID * GRID)]
    torch.testing.assert_close(torch.stack(logits, 1), expected, atol=1e-5, rtol=0)
    assert decoder.cache.length == T + GRID * GRID
    assert all(not block.attention.qkv._forward_hooks for block in model.blocks)


def test_rows_with_the_same_text_share_one_prefill():
    """Best-of-k: k candidates of a caption (and guidance's blank rows) run the prompt once
    per distinct row; every row's cache and logits equal those of its own prefill, and
    sampling gives the codes it gives one caption at a time."""
    model = tiny("sparse")
    text, codes = inputs(batch=2)
    repeated = text.repeat_interleave(3, 0)  # (6, T): 2 captions x 3 candidates
    rows_seen = []
    handle = model.blocks[0].attention.qkv.register_forward_hook(
        lambda module, args, out: rows_seen.append(out.shape[0])
    )
    with torch.no_grad():
        shared = KVDecoder(model, batch=6)
        logits = shared.prefill(repeated)
        own = KVDecoder(model, batch=2)
        expected = own.prefill(text)
    handle.remove()
    assert rows_seen == [2, 2]  # the shared prefill ran 2 rows, not 6
    torch.testing.assert_close(logits, expected.repeat_interleave(3, 0), atol=1e-6, rtol=0)
    filled = own.cache.length
    torch.testing.assert_close(
        torch.stack(shared.cache.layers)[..., :filled, :],
        torch.stack(own.cache.layers)[..., :filled, :].repeat_interleave(3, 2),
        atol=1e-6,
        rtol=0,
    )
    sampling = SamplingConfig(temperature=0.8, cond_scale=2.0)
    g = torch.Generator().manual_seed(0)
    together = sample_codes(model, repeated, sampling, g, keep_logits=True)
    alone = sample_codes(
        model, repeated, sampling, g.manual_seed(0), use_cache=False, keep_logits=True
    )
    assert torch.equal(together.codes, alone.codes)
    torch.testing.assert_close(together.logits, alone.logits, atol=1e-5, rtol=0)


def test_each_generation_uses_the_current_weights():
    """After the weights change, cached sampling still equals the uncached forward: the
    decoder keeps no stale copy of an earlier generation's weights."""
    model = tiny("sparse")
    text, _ = inputs(batch=2)
    sample_codes(model, text, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for block in model.blocks:
            block.mlp[0].weight.mul_(3.0)
    cached, uncached = cached_and_uncached(model, text, seed=3)
    torch.testing.assert_close(cached.logits, uncached.logits, atol=1e-5, rtol=0)


def test_guided_sampling_mixes_caption_and_blank_logits_with_and_without_cache():
    """cond_scale s: logits = blank + s * (caption - blank), the blank row fed the same codes."""
    model = tiny("sparse")
    text, _ = inputs(batch=2)
    runs = cached_and_uncached(model, text, seed=5, cond_scale=3.0)
    assert torch.equal(runs[0].codes, runs[1].codes) and runs[0].codes.shape == (2, GRID**2)
    torch.testing.assert_close(runs[0].logits, runs[1].logits, atol=1e-5, rtol=0)
    codes = runs[0].codes
    with torch.no_grad():
        caption = model(text, codes).image_logits
        blank = model(blank_text(model, 2, "cpu"), codes).image_logits
    torch.testing.assert_close(runs[0].logits, blank + 3.0 * (caption - blank), atol=1e-4, rtol=0)
    assert blank_text(model, 1, "cpu").tolist() == [list(range(TEXT_VOCAB, TEXT_VOCAB + T))]


def test_sampling_settings_left_unset_come_from_the_checkpoint():
    trained = SamplingConfig(temperature=0.5, top_k=None, top_p=0.9, cond_scale=1.5)
    requested = {"temperature": None, "top_k": None, "top_p": 1.0, "cond_scale": None}
    assert resolve_sampling(requested, trained, guidance_trained=True) == SamplingConfig(
        temperature=0.5,
        top_k=None,
        top_p=1.0,  # given: nucleus filtering off
        cond_scale=1.5,
    )
    # a checkpoint from before sampling settings were saved: the plain sampler
    plain = resolve_sampling({}, SamplingConfig(), guidance_trained=False)
    assert asdict(plain) == {
        "temperature": 1.0,
        "top_k": None,
        "top_p": None,
        "cond_scale": 1.0,
        "jacobi_window": 0,
    }
    # guidance on a prior that never saw a blank caption is refused, naming the fix
    for trained_scale, asked in ((1.5, None), (1.0, 2.0)):
        with pytest.raises(ConfigError) as err:
            resolve_sampling({"cond_scale": asked}, SamplingConfig(cond_scale=trained_scale), False)
        assert err.value.field == "sampling.cond_scale"
        assert "model.caption_dropout" in str(err.value)
    with pytest.raises(ConfigError, match="temperature") as err:
        resolve_sampling({"temperature": 0.0}, trained, True)
    assert err.value.field == "sampling.temperature"
    with pytest.raises(ConfigError, match="an integer or null") as err:
        resolve_sampling({"top_k": "many"}, trained, True)
    assert err.value.field == "sampling.top_k"
    with pytest.raises(ConfigError, match="jacobi_window") as err:
        resolve_sampling({"jacobi_window": -2}, trained, True)
    assert err.value.field == "sampling.jacobi_window"


def test_sampling_is_seeded():
    model = tiny()
    text, _ = inputs(batch=2)
    a = sample_codes(model, text, generator=torch.Generator().manual_seed(5)).codes
    b = sample_codes(model, text, generator=torch.Generator().manual_seed(5)).codes
    c = sample_codes(model, text, generator=torch.Generator().manual_seed(6)).codes
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2, GRID * GRID) and a.min() >= 0 and a.max() < IMAGE_VOCAB


@torch.no_grad()
def test_flex_attention_block_masks_equal_boolean_masks():
    text, codes = inputs()
    sdpa = tiny("sparse", "sdpa")(text, codes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager (unfused) FlexAttention on CPU
        flex = tiny("sparse", "flex")(text, codes)
    torch.testing.assert_close(flex.image_logits, sdpa.image_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(flex.text_logits, sdpa.text_logits, atol=1e-5, rtol=0)


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ...
    kept = torch.isfinite(filter_logits(logits, top_p=0.8)[0])
    assert kept.tolist() == [True, True, False, False, False]
    assert probs[:1].sum() < 0.8 <= probs[:2].sum()
    assert torch.isfinite(filter_logits(logits, top_p=0.01)[0, 0])  # the best id always stays


def test_loss_normalises_text_and_image_separately_then_weights_them():
    text_logits = torch.zeros(2, 4, 10)
    image_logits = torch.zeros(2, 9, 5)
    text, codes = torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 9, dtype=torch.long)
    total, text_loss, image_loss = prior_loss(text_logits, image_logits, text, codes, 1 / 8)
    torch.testing.assert_close(text_loss, torch.tensor(10.0).log())  # uniform over 10 ids
    torch.testing.assert_close(image_loss, torch.tensor(5.0).log())
    torch.testing.assert_close(total, text_loss / 8 + 7 * image_loss / 8)


def test_paper_sizes_build_on_the_meta_device():
    config = PriorConfig(
        text_vocab=16384,
        text_seq_len=256,
        image_vocab=8192,
        grid_size=32,
        dim=62 * 64,
        depth=64,
        heads=62,
    )
    with torch.device("meta"):
        model = PriorTransformer(config)
    params = sum(p.numel() for p in model.parameters())
    assert 11.5e9 < params < 12.5e9  # the paper's 12-billion-parameter transformer
    assert model.patterns[-1] == "conv" and model.patterns.count("column") == 16


def test_bad_sizes_name_the_field():
    with pytest.raises(ValueError, match=r"dim=100 is invalid: a multiple of heads=8"):
        PriorConfig(dim=100, heads=8)
    with pytest.raises(ValueError, match=r"attention='dense' is invalid"):
        PriorConfig(attention="dense")


def test_gumbel_max_samples_the_softmax_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, float("-inf")]]).expand(20000, 4)
    ids = gumbel_max(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=4).float() / len(ids)
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.01, rtol=0)
    assert freq[3] == 0  # filtered ids are never drawn
