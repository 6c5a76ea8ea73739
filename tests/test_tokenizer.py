"""BPE tokenizer: the paper's vocabulary rule, per-position padding, dropout in training only."""

from __future__ import annotations

import sys

import torch

from dalle_lightning.data.shapes import ShapesConfig, ShapesDataset
from dalle_lightning.text.tokenizer import BPETokenizer
from tests.conftest import run_command

CAPTIONS = [ShapesDataset(ShapesConfig(), "train", 400).render(i)[1] for i in range(400)]


def make(vocab_size: int = 80, text_seq_len: int = 12) -> BPETokenizer:
    return BPETokenizer.train(CAPTIONS, vocab_size, text_seq_len)


def test_round_trip_lowercases_and_splits_on_non_letters():
    tok = make(text_seq_len=32)
    caption = "A small Red circle, ABOVE a green-triangle!"
    ids = tok.encode([caption])
    assert tok.decode(ids[0]) == "a small red circle above a green triangle"
    # digits and punctuation never reach the model
    assert torch.equal(tok.encode(["a red circle 42 ?!"]), tok.encode(["a red circle"]))


def test_per_position_pad_ids_fill_where_no_text_token_exists():
    tok = make(vocab_size=80, text_seq_len=12)
    ids = tok.encode(["a red circle", "a large blue square on the left"])
    n = len(tok.token_ids("a red circle"))
    assert ids.shape == (2, 12)
    assert (ids[0, :n] < 80).all()
    assert ids[0, n:].tolist() == [80 + j for j in range(n, 12)]  # pad id = vocab + position
    assert ids.max() < tok.num_ids == 80 + 12


def test_truncation_is_counted():
    tok = make(text_seq_len=4)
    long = "a large blue square to the left of a small white diamond"
    assert tok.encode([long]).shape == (1, 4)
    assert tok.count_truncated([long, "a red circle"]) == (1, 2)


def test_bpe_dropout_only_when_asked():
    tok = make(vocab_size=120, text_seq_len=64)
    caption = "there is a large yellow triangle to the left of a small purple diamond"
    plain = tok.encode([caption])
    assert all(torch.equal(tok.encode([caption]), plain) for _ in range(5))
    dropped = [tok.encode([caption], dropout=0.5) for _ in range(20)]
    assert any(not torch.equal(d, plain) for d in dropped)
    # dropout splits merges into smaller pieces that decode to the same text
    assert all(tok.decode(d[0]) == tok.decode(plain[0]) for d in dropped)
    assert torch.equal(tok.encode([caption]), plain)  # switched off again afterwards


def test_state_round_trip(tmp_path):
    tok = make()
    again = BPETokenizer.from_state(tok.state())
    assert torch.equal(again.encode(CAPTIONS[:20]), tok.encode(CAPTIONS[:20]))
    tok.save(tmp_path / "tokenizer.json")
    loaded = BPETokenizer.load(tmp_path / "tokenizer.json", tok.vocab_size, tok.text_seq_len)
    assert torch.equal(loaded.encode(CAPTIONS[:20]), tok.encode(CAPTIONS[:20]))


def test_training_gives_the_same_file_in_every_process():
    """HF numbers single characters in a per-process hash order; the ids are renumbered, so a
    fresh `logs/` learns the same tokenizer (the runs of a recipe can repeat bitwise)."""
    program = (
        "import hashlib, sys; sys.path.insert(0, '.'); "
        "from tests.test_tokenizer import make; "
        "print(hashlib.sha256(make(200, 16).tokenizer.to_str().encode()).hexdigest())"
    )
    runs = [run_command([sys.executable, "-c", program]) for _ in range(3)]
    assert all(run.returncode == 0 for run in runs), runs[0].stderr[-2000:]
    digests = {run.stdout for run in runs}
    assert len(digests) == 1
    tok = make(200, 16)
    assert tok.tokenizer.token_to_id("[UNK]") == 0
    assert tok.decode(tok.encode(CAPTIONS[:1])[0]) == CAPTIONS[0].lower()
