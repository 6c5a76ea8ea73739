"""Stage-2 batches: BPE text ids and cached dVAE codes, from any image-caption datamodule.

Batch: {"text": (B, T) long (per-position pads), "codes": (B, N) long, "caption": list[str]}.
BPE-dropout applies to the training loader only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from dalle_lightning.data.datamodule import ImageTextDataModule
from dalle_lightning.data.token_cache import load_or_encode, load_or_train_tokenizer
from dalle_lightning.models.image_tokenizer import ImageTokenizer
from dalle_lightning.text.tokenizer import BPETokenizer, TextConfig

log = logging.getLogger(__name__)


class TokenDataset(Dataset):
    """Cached codes with a caption and its BPE ids: with `random_caption` (training) one of the
    image's captions drawn each time when the cache holds several (COCO: ~5), else its first;
    BPE-dropout `dropout`. Both draw from torch's generator, which the training loader seeds
    per item by (seed, epoch, index) (`resumable.SeededDraws`): a run repeats and resumes
    bitwise with dropout on."""

    def __init__(
        self,
        tokens: dict,
        tokenizer: BPETokenizer,
        random_caption: bool = False,
        dropout: float = 0.0,
    ):
        self.codes, self.captions = tokens["codes"], tokens["captions"]
        self.all_captions = tokens.get("all_captions") if random_caption else None
        self.tokenizer, self.dropout = tokenizer, dropout

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        caption = self.captions[index]
        if self.all_captions is not None:
            options = self.all_captions[index]
            caption = options[int(torch.randint(len(options), ()))]
        return {
            "text": self.tokenizer.encode([caption], self.dropout)[0],
            "codes": self.codes[index].flatten().long(),
            "caption": caption,
        }


def collate_tokens(items: list[dict]) -> dict:
    return {
        "text": torch.stack([it["text"] for it in items]),
        "codes": torch.stack([it["codes"] for it in items]),
        "caption": [it["caption"] for it in items],
    }


class TokenDataModule(LightningDataModule):
    """The token cache of `dvae` (whose checkpoint file has sha256 `dvae_sha256`) over the
    images and captions of `images`, with `text`'s BPE tokenizer (learned from the training
    captions in `prepare_data` unless given)."""

    def __init__(
        self,
        images: ImageTextDataModule,
        dvae: ImageTokenizer,
        dvae_sha256: str,
        cache_dir: str | Path,
        text: TextConfig = TextConfig(),
        tokenizer: BPETokenizer | None = None,
    ):
        super().__init__()
        self.images, self.dvae, self.dvae_sha256 = images, dvae, dvae_sha256
        self.cache_dir, self.text = cache_dir, text
        self.tokenizer = tokenizer
        self.tokens: dict[str, dict] = {}
        self._truncation_reported = False
        self.prepare_data_per_node = False  # the cache sits in the shared logs/: one writer

    def prepare_data(self) -> None:
        """Lightning runs this in the global rank 0 alone while the other ranks wait, then
        `setup` in every rank: the train codes and the BPE are written once and every rank
        loads the same files. Ranks learning their own BPE at once could break ties
        differently and disagree on the ids."""
        self.setup()

    def split_tokens(self, split: str) -> dict:
        source = self.images.source(split)  # splits with one source share one cache
        pre_encoded = getattr(self.images, "pre_encoded", None)  # token shards (shards.py)
        if source not in self.tokens and pre_encoded is not None:
            self.tokens[source] = pre_encoded(source, self.dvae_sha256)  # None: not given
        if self.tokens.get(source) is None:
            self.images.setup()
            self.tokens[source] = load_or_encode(
                self.dvae,
                self.dvae_sha256,
                self.images.identity(),
                self.images.cache_dataset(split),
                source,
                self.cache_dir,
            )
        return self.tokens[source]

    def data_report(self) -> dict:
        return self.images.data_report()

    def setup(self, stage: str | None = None) -> None:
        tokens = self.split_tokens("train")
        captions = tokens["captions"]
        if "all_captions" in tokens:  # several per image (COCO, CUB): learn BPE from all
            captions = [c for options in tokens["all_captions"] for c in options]
        if self.tokenizer is None:
            self.tokenizer = load_or_train_tokenizer(
                captions,
                self.images.identity(),
                self.text.vocab_size,
                self.text.text_seq_len,
                self.cache_dir,
            )
        if self._truncation_reported:  # Lightning calls setup again for test: report once
            return
        self._truncation_reported = True
        long, total = self.tokenizer.count_truncated(captions)
        if long:
            log.warning(
                "%d of %d training captions (%.2f%%) have more than text_seq_len=%d tokens "
                "and are truncated",
                long,
                total,
                100 * long / total,
                self.text.text_seq_len,
            )

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        dropout = self.text.bpe_dropout if train else 0.0
        dataset = TokenDataset(self.split_tokens(split), self.tokenizer, train, dropout)
        return self.images.make_loader(dataset, train, collate_tokens, owner=self)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
