"""Seeded BPE-dropout (Provilkov et al., 2019) over a trained HF `tokenizers` BPE.

HF `tokenizers` applies BPE-dropout with an unseeded generator inside Rust, so a training run
that uses it neither repeats nor resumes bitwise. This module applies the same algorithm to
the same merges with a generator the caller passes (`random.Random`), so the pieces of a
caption become a function of that generator's seed: the stage-2 dataset seeds it by
(run seed, epoch, item) (`data/resumable.py`).

The algorithm is HF's (`Word::merge_all` in tokenizers' `models/bpe/word.rs`), kept exactly
so that the distribution is the same (`tests/test_bpe_dropout.py` compares the two):
- a word starts as its characters, the last one with the end-of-word suffix; a character
  outside the vocabulary is the unknown token;
- a priority queue holds every applicable merge, lowest merge rank first, then leftmost;
- each popped merge is skipped with probability p (set aside); a merge that is applied first
  returns the set-aside ones to the queue, then merges and queues the new pairs it forms;
- the word is done when the queue is empty.
HF keeps normalising and splitting captions (`normalize_str`, `pre_tokenize_str`), training
the merges, and encoding without dropout.
"""

from __future__ import annotations

import heapq
import json
import random

from tokenizers import Tokenizer


def merge_pairs(model: dict) -> list[tuple[str, str]]:
    """The merges of an HF BPE model's JSON, in rank order ("a b" strings or [a, b] pairs,
    depending on the `tokenizers` version that wrote it)."""
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


class SeededBPEDropout:
    """The merges of a trained BPE `tokenizer`, applied with dropout from a given generator."""

    def __init__(self, tokenizer: Tokenizer):
        model = json.loads(tokenizer.to_str())["model"]
        if model.get("type") != "BPE" or model.get("continuing_subword_prefix"):
            raise ValueError("SeededBPEDropout needs a BPE model without a subword prefix")
        self.vocab: dict[str, int] = model["vocab"]
        self.suffix: str = model.get("end_of_word_suffix") or ""
        unk = model.get("unk_token")
        self.unk_id: int | None = self.vocab[unk] if unk is not None else None
        self.merges: dict[tuple[int, int], tuple[int, int]] = {}  # pair -> (rank, new id)
        for rank, (a, b) in enumerate(merge_pairs(model)):
            self.merges[(self.vocab[a], self.vocab[b])] = (rank, self.vocab[a + b])
        self.normalizer, self.pre_tokenizer = tokenizer.normalizer, tokenizer.pre_tokenizer
        self._start: dict[str, tuple] = {}  # word -> `_initial(word)`

    def token_ids(self, text: str, p: float, rng: random.Random) -> list[int]:
        """Ids of `text` (normalised and split as HF does), each word merged with dropout p."""
        if self.normalizer is not None:
            text = self.normalizer.normalize_str(text)
        words = [w for w, _ in self.pre_tokenizer.pre_tokenize_str(text)]
        return [i for word in words for i in self.word_ids(word, p, rng)]

    def word_ids(self, word: str, p: float, rng: random.Random) -> list[int]:
        start = self._start.get(word)
        if start is None:
            start = self._start[word] = self._initial(word)
            if len(self._start) > 100_000:  # a bounded cache: captions repeat their words
                self._start.clear()
        symbols, queue = list(start[0]), list(start[1])
        n = len(symbols)
        prev, nxt = list(range(-1, n - 1)), list(range(1, n + 1))
        alive = [True] * n
        merges, pop, push = self.merges, heapq.heappop, heapq.heappush
        skipped: list[tuple[int, int, int]] = []
        while queue:
            top = pop(queue)
            if p and rng.random() < p:
                skipped.append(top)
                continue
            for entry in skipped:  # an applied merge brings the skipped ones back
                push(queue, entry)
            skipped.clear()
            _, pos, new_id = top
            right = nxt[pos]
            if not alive[pos] or right >= n:
                continue
            found = merges.get((symbols[pos], symbols[right]))
            if found is None or found[1] != new_id:  # an outdated entry
                continue
            symbols[pos] = new_id
            alive[right] = False
            after = nxt[pos] = nxt[right]
            if after < n:
                prev[after] = pos
                found = merges.get((new_id, symbols[after]))
                if found is not None:
                    push(queue, (found[0], pos, found[1]))
            before = prev[pos]
            if before >= 0:
                found = merges.get((symbols[before], new_id))
                if found is not None:
                    push(queue, (found[0], before, found[1]))
        return [s for s, keep in zip(symbols, alive, strict=True) if keep]

    def _initial(self, word: str) -> tuple[tuple[int, ...], tuple[tuple[int, int, int], ...]]:
        """A word's symbols before any merge, and its applicable merges as a heap."""
        symbols = []
        for k, char in enumerate(word):
            piece = char + self.suffix if k == len(word) - 1 else char
            token = self.vocab.get(piece, self.unk_id)
            if token is not None:  # no unknown token: HF drops the character too
                symbols.append(token)
        queue = []  # (merge rank, position, merged id): lowest rank first, then leftmost
        for pos in range(len(symbols) - 1):
            found = self.merges.get((symbols[pos], symbols[pos + 1]))
            if found is not None:
                queue.append((found[0], pos, found[1]))
        heapq.heapify(queue)
        return tuple(symbols), tuple(queue)
