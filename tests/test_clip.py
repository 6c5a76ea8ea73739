"""The rerankers: the in-project CLIP (model, training, checkpoint -> `TrainedClip`) and the
open_clip path with a local weights file.

No pretrained CLIP can be downloaded here: the open_clip tests build a tiny open_clip model
with random weights, save it, and load it through the same `pretrained=<file>` path a user's
real ViT-B-32 file takes. Its scores mean nothing; what is tested is the loading and scoring.
"""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from torchvision.transforms.functional import to_pil_image

from dalle_lightning.config import ConfigError
from dalle_lightning.models.clip import ClipConfig, ContrastiveModel, contrastive_loss, recall_at_1
from dalle_lightning.sampling.rerank import OpenClip, TrainedClip
from dalle_lightning.train import train

TINY = ClipConfig(text_vocab=40, text_seq_len=8, text_dim=32, text_depth=1, text_heads=2,
                  image_size=16, image_channels=(8, 16), pool=2, embed_dim=16)  # fmt: skip


def test_contrastive_model_learns_to_match_pairs():
    torch.manual_seed(0)
    model = ContrastiveModel(TINY)
    images = torch.rand(12, 3, 16, 16)
    text = torch.randint(0, 40, (12, 8))
    text[:, 5:] = 40 + torch.arange(5, 8)  # per-position pads
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = contrastive_loss(model(text, images))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 2.0 and loss.item() < 0.1  # ln(12) = 2.48 at chance
    with torch.no_grad():
        i2t, t2i = recall_at_1(
            model.encode_image(images), model.encode_text(text), list("abcdefghijkl")
        )
        sim = model.similarity(text, images)
    assert i2t == 1.0 and t2i == 1.0
    assert sim.shape == (12,) and (sim.abs() <= 1 + 1e-6).all()  # cosine


def test_logit_scale_is_clamped_at_100():
    model = ContrastiveModel(TINY)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
        logits = model(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 3, 16, 16))
    assert logits.abs().max() <= 100 + 1e-4


def test_recall_counts_a_duplicate_caption_as_right():
    emb = torch.eye(3)
    # image 1 and image 2 share a caption: retrieving either is right
    swapped = emb[[0, 2, 1]]
    assert recall_at_1(emb, swapped, ["a", "b", "b"]) == (1.0, 1.0)
    assert recall_at_1(emb, swapped, ["a", "b", "c"]) == (1 / 3, 1 / 3)


CLIP_RUN = [
    "model=clip",
    "debug=limit",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.accelerator=cpu",
    "dataset.image_size=32",
    "dataset.batch_size=8",
    "dataset.num_train=32",
    "dataset.num_val=16",
    "dataset.num_test=16",
    "model.vocab_size=64",
    "model.net.text_dim=32",
    "model.net.text_depth=1",
    "model.net.image_channels=[8,16]",
    "model.net.embed_dim=16",
]


def test_train_clip_logs_recall_and_its_checkpoint_reranks(make_cfg, tmp_path):
    cfg = make_cfg(CLIP_RUN)
    assert cfg.task_name == "train_clip" and cfg.dataset.batch_size == 8
    _, summary = train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    for key in ("val/r1_image_to_text", "val/r1_text_to_image", "test/r1_image_to_text"):
        assert 0 <= metrics[key] <= 1, key
    ckpt = summary["checkpoints"]["last"]

    reranker = TrainedClip(ckpt)
    images, captions = torch.rand(5, 3, 32, 32), ["a red circle", "a blue square"] * 2 + ["x"]
    scores = reranker.score(images, captions)
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert raw["clip_config"]["image_size"] == 32
    expected = reranker.model.similarity(reranker.tokenizer.encode(captions), images)
    assert scores.shape == (5,) and torch.allclose(scores, expected, atol=1e-6)  # fp32 batching
    # the weights are the trained ones, not a fresh init
    key = "net.image.proj.weight"
    assert torch.equal(
        reranker.model.state_dict()[key.removeprefix("net.")], raw["state_dict"][key]
    )
    described = reranker.describe()
    assert described["name"] == "trained" and described["ckpt_path"] == str(ckpt)
    assert described["trained_on"]["dataset"] == "shapes"
    assert described["trained_on"]["image_size"] == 32
    with pytest.raises(ValueError, match="trained at 32 px"):
        reranker.score(torch.rand(1, 3, 16, 16), ["x"])


def test_trained_reranker_without_a_checkpoint_says_train_one(tmp_path):
    with pytest.raises(ConfigError, match="python train.py model=clip"):
        TrainedClip(None, runs_dir=str(tmp_path))


TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A tiny open_clip architecture registered under a test name, with random weights saved
    as a checkpoint file (what a user passes as reranker.checkpoint=PATH)."""
    root = tmp_path_factory.mktemp("open_clip")
    (root / "Tiny-Test-CLIP.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(root)
    torch.manual_seed(0)
    model = open_clip.create_model("Tiny-Test-CLIP", pretrained=None)
    path = root / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return "Tiny-Test-CLIP", path, model.eval()


def test_open_clip_reranker_loads_a_local_checkpoint(tiny_open_clip):
    name, path, reference = tiny_open_clip
    reranker = OpenClip(model_name=name, checkpoint=str(path), device="cpu")
    for key, value in reference.state_dict().items():
        assert torch.equal(reranker.model.state_dict()[key], value), key
    images = torch.rand(3, 3, 64, 64)
    captions = ["a red circle", "a blue square", "a bird"]
    scores = reranker.score(images, captions)
    # the same numbers by hand: open_clip's own preprocessing, tokenizer and encoders
    _, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    pixels = torch.stack([preprocess(to_pil_image(im)) for im in images])
    tokens = open_clip.get_tokenizer(name)(captions)
    with torch.no_grad():
        img = reference.encode_image(pixels, normalize=True)
        txt = reference.encode_text(tokens, normalize=True)
    assert torch.allclose(scores, (img * txt).sum(-1), atol=1e-5)
    assert reranker.describe()["weights"] == str(path)


def test_open_clip_without_network_names_the_checkpoint_override(tiny_open_clip, monkeypatch):
    import open_clip.factory as factory

    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': no network")

    monkeypatch.setattr(factory, "download_pretrained", offline)
    monkeypatch.setattr(factory, "get_pretrained_cfg", lambda *a, **k: {"url": "x"})
    with pytest.raises(RuntimeError, match=r"pass reranker\.checkpoint=PATH"):
        OpenClip(model_name=tiny_open_clip[0], pretrained="openai", device="cpu")
    with pytest.raises(ConfigError, match="reranker.checkpoint"):
        OpenClip(model_name=tiny_open_clip[0], checkpoint="/no/such/file.pt")
