"""BPE caption tokenizer of the prior (Ramesh et al., 2021, sec. 2.2 and B.2), on HF `tokenizers`.

- Lowercase, then split on anything except a-z before merging (the paper's vocabulary rule):
  digits and punctuation never reach the model.
- BPE-dropout (Provilkov et al., 2019) with rate `dropout` only while training; evaluation and
  generation always encode deterministically. The dropout is ours (`bpe_dropout.py`, HF's
  algorithm over HF's merges) and draws from the torch generator, so a seeded caller gets the
  same pieces every time; HF's own dropout is unseeded.
- A fixed length `text_seq_len`: longer captions are truncated (counted, see
  `count_truncated`); positions without a text token get a pad token of their own,
  id `vocab_size + position` (paper sec. B.2), instead of an attention mask.

Shape legend: B captions, T text_seq_len.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch import Tensor

from dalle_lightning.config import ConfigError, require_float, require_int
from dalle_lightning.text.bpe_dropout import SeededBPEDropout, merge_pairs

UNK = "[UNK]"
END_OF_WORD = "</w>"


@dataclass(frozen=True)
class TextConfig:
    """The prior's captions (`model.text`). Paper: 16384 BPE ids, 256 tokens, BPE-dropout 0.1."""

    vocab_size: int = 512  # BPE ids; pad ids vocab_size .. vocab_size + text_seq_len - 1 follow
    text_seq_len: int = 32
    bpe_dropout: float = 0.1  # training only

    def __post_init__(self) -> None:
        require_int("vocab_size", self.vocab_size, 2)
        require_int("text_seq_len", self.text_seq_len, 1)
        require_float("bpe_dropout", self.bpe_dropout, 0.0, 1.0)


class BPETokenizer:
    """Captions <-> (B, T) ids in [0, vocab_size + T): text ids, then one pad id per position."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, text_seq_len: int):
        require_int("vocab_size", vocab_size, 2)
        require_int("text_seq_len", text_seq_len, 1)
        learned = tokenizer.get_vocab_size()
        if learned > vocab_size:  # the captions' alphabet and the special ids need `learned`
            raise ConfigError(
                "model.text.vocab_size",
                vocab_size,
                f"at least {learned}: the captions' characters and special ids alone need that",
            )
        self.tokenizer, self.vocab_size, self.text_seq_len = tokenizer, vocab_size, text_seq_len
        self._dropout: SeededBPEDropout | None = None  # built on the first dropout call

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int, text_seq_len: int) -> BPETokenizer:
        """Learn merges on `captions` until `vocab_size` ids (or no pair is left to merge).

        HF numbers the single characters in the order of a hash map seeded per process, so
        the same captions gave other ids in every process; `_canonical_ids` renumbers them
        and the same captions now give the same tokenizer file.
        """
        require_int("vocab_size", vocab_size, 2)
        tokenizer = Tokenizer(models.BPE(unk_token=UNK, end_of_word_suffix=END_OF_WORD))
        tokenizer.normalizer = normalizers.Lowercase()
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("[^a-z]+"), behavior="removed")
        tokenizer.decoder = decoders.BPEDecoder(suffix=END_OF_WORD)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[UNK],
            end_of_word_suffix=END_OF_WORD,
            show_progress=False,
        )
        tokenizer.train_from_iterator(captions, trainer)
        return cls(_canonical_ids(tokenizer), vocab_size, text_seq_len)

    @property
    def num_ids(self) -> int:
        """Size of the prior's text embedding: text ids plus one pad id per position."""
        return self.vocab_size + self.text_seq_len

    def pad_id(self, position: int) -> int:
        return self.vocab_size + position

    def token_ids(self, caption: str, dropout: float = 0.0) -> list[int]:
        """BPE ids of one caption, untruncated; BPE-dropout with probability `dropout`, drawn
        from a generator seeded by one draw of torch's default generator."""
        require_float("dropout", dropout, 0.0, 1.0)
        if not dropout:
            return self.tokenizer.encode(caption).ids
        if self._dropout is None:
            self._dropout = SeededBPEDropout(self.tokenizer)
        rng = random.Random(int(torch.randint(2**62, ())))
        return self._dropout.token_ids(caption, dropout, rng)

    def encode(self, captions: Sequence[str], dropout: float = 0.0) -> Tensor:
        """captions -> (B, T) long: ids truncated to T, then per-position pad ids."""
        T, V = self.text_seq_len, self.vocab_size
        rows = []
        for caption in captions:
            ids = self.token_ids(caption, dropout)[:T]
            rows.append(ids + list(range(V + len(ids), V + T)))
        return torch.tensor(rows, dtype=torch.long).view(len(captions), T)

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """Text of one row of ids; pad ids are dropped."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return self.tokenizer.decode([i for i in ids if i < self.vocab_size])

    def count_truncated(self, captions: Iterable[str]) -> tuple[int, int]:
        """(captions longer than text_seq_len tokens, captions) without dropout."""
        total = long = 0
        for caption in captions:
            total += 1
            long += len(self.token_ids(caption)) > self.text_seq_len
        return long, total

    # persistence: one JSON string (HF's format) plus the two sizes
    def state(self) -> dict:
        return {
            "tokenizer_json": self.tokenizer.to_str(),
            "vocab_size": self.vocab_size,
            "text_seq_len": self.text_seq_len,
        }

    @classmethod
    def from_state(cls, state: dict) -> BPETokenizer:
        tokenizer = Tokenizer.from_str(state["tokenizer_json"])
        return cls(tokenizer, state["vocab_size"], state["text_seq_len"])

    def save(self, path: str | Path) -> None:
        """The HF tokenizer file (loadable with `tokenizers.Tokenizer.from_file`)."""
        self.tokenizer.save(str(path))

    @classmethod
    def load(cls, path: str | Path, vocab_size: int, text_seq_len: int) -> BPETokenizer:
        return cls(Tokenizer.from_file(str(path)), vocab_size, text_seq_len)


def _canonical_ids(tokenizer: Tokenizer) -> Tokenizer:
    """The same BPE with ids that depend on its merges only: [UNK] 0, then the single
    characters (with and without the end-of-word suffix) sorted, then each merge's result in
    merge order. The merges, and so the pieces of every caption, are unchanged."""
    state = json.loads(tokenizer.to_str())
    model = state["model"]
    merged = list(dict.fromkeys(a + b for a, b in merge_pairs(model)))
    made = set(merged)
    single = sorted(t for t in model["vocab"] if t not in made and t != UNK)
    order = [UNK, *single, *merged]
    if sorted(order) != sorted(model["vocab"]):  # HF's trainer changed: keep its numbering
        return tokenizer
    model["vocab"] = {token: i for i, token in enumerate(order)}
    for added in state.get("added_tokens") or []:
        added["id"] = model["vocab"].get(added["content"], added["id"])
    return Tokenizer.from_str(json.dumps(state))
