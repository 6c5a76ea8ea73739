"""Training of the in-project reranker: `python train.py model=clip` (see `models/clip.py`).

Images and captions come straight from an image-caption datamodule (the training split draws
one caption per image); captions become the project's BPE ids, the same tokenizer file the
prior of that dataset uses (`data/token_cache.load_or_train_tokenizer`). Objective: symmetric
InfoNCE over the batch with a learned temperature. Validation logs retrieval R@1 both ways
over the whole split. AdamW, linear warm-up, cosine decay to `lr_final_ratio`.

The checkpoint carries `clip_config` and the tokenizer, so `evaluation/rerankers.py` rebuilds
the model from the file alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from dalle_lightning.config import ConfigError, require, require_float, require_int
from dalle_lightning.data.datamodule import ImageTextDataModule
from dalle_lightning.data.token_cache import load_or_train_tokenizer
from dalle_lightning.models.clip import ClipConfig, ContrastiveModel, contrastive_loss, recall_at_1
from dalle_lightning.modules.schedules import cosine_anneal
from dalle_lightning.text.tokenizer import BPETokenizer

log = logging.getLogger(__name__)


class ClipModule(LightningModule):
    """Field names in errors are relative to the `model` config group."""

    VALIDATION_METRICS = ("val/loss", "val/r1_image_to_text", "val/r1_text_to_image")

    def __init__(
        self,
        net: dict,
        vocab_size: int = 512,
        cache_dir: str = "logs/token_cache",
        optimizer: Callable | None = None,
        warmup_steps: int = 100,
        lr_final_ratio: float = 0.05,
    ):
        super().__init__()
        require_int("vocab_size", vocab_size, 2)
        require_int("warmup_steps", warmup_steps, 0)
        require_float("lr_final_ratio", lr_final_ratio, 0.0, 1.0)
        try:
            config = ClipConfig(text_vocab=vocab_size, **net)
        except TypeError as err:
            raise ConfigError("net", dict(net), f"fields of ClipConfig only ({err})") from None
        except ValueError as err:
            raise ConfigError("net", dict(net), str(err)) from None
        self.save_hyperparameters(ignore=["optimizer"])
        self.net = ContrastiveModel(config)
        self.optimizer = optimizer
        self.tokenizer: BPETokenizer | None = None
        self._val: list[tuple[Tensor, Tensor, list[str]]] = []

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        require(
            isinstance(datamodule, ImageTextDataModule),
            "dataset",
            type(datamodule).__name__,
            "an image-caption dataset (shapes, coco, cub, folder)",
        )
        if self.tokenizer is None:
            datamodule.setup()
            train = datamodule.datasets["train"]
            captions = [c for i in range(len(train)) for c in train.captions_of(i)]
            self.tokenizer = load_or_train_tokenizer(
                captions,
                datamodule.identity(),
                self.hparams.vocab_size,
                self.net.config.text_seq_len,
                self.hparams.cache_dir,
            )

    def _text(self, captions: list[str]) -> Tensor:
        return self.tokenizer.encode(captions).to(self.device)

    # objective -----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = contrastive_loss(self.net(self._text(batch["caption"]), batch["image"]))
        n = len(batch["caption"])
        self.log("train/loss", loss, batch_size=n, prog_bar=True)
        self.log("train/temperature", 1 / self.net.scale(), batch_size=n)
        return loss

    def _eval_step(self, batch: dict, stage: str) -> None:
        text = self._text(batch["caption"])
        image_emb, text_emb = self.net.encode_image(batch["image"]), self.net.encode_text(text)
        loss = contrastive_loss(self.net.logits(image_emb, text_emb))
        n = len(batch["caption"])
        self.log(f"{stage}/loss", loss, batch_size=n, sync_dist=True)
        self._val.append((image_emb.float().cpu(), text_emb.float().cpu(), batch["caption"]))

    def _eval_epoch_end(self, stage: str) -> None:
        """R@1 over the whole split (each process's share of it under DDP)."""
        if not self._val:
            return
        image_emb = torch.cat([v[0] for v in self._val])
        text_emb = torch.cat([v[1] for v in self._val])
        captions = [c for v in self._val for c in v[2]]
        i2t, t2i = recall_at_1(image_emb, text_emb, captions)
        self.log(f"{stage}/r1_image_to_text", i2t)
        self.log(f"{stage}/r1_text_to_image", t2i)
        self._val = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # optimisation --------------------------------------------------------------------------
    def configure_optimizers(self):
        params = self.trainer.model.parameters()
        optimizer = self.optimizer(params) if self.optimizer else torch.optim.AdamW(params)
        total = self.trainer.max_steps
        if total is None or total <= 0:
            raise ConfigError("trainer.max_steps", total, "an integer >= 1 (the cosine length)")
        warmup, ratio = self.hparams.warmup_steps, self.hparams.lr_final_ratio

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return cosine_anneal(step - warmup, 1.0, ratio, max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["clip_config"] = asdict(self.net.config)
        checkpoint["tokenizer"] = self.tokenizer.state() if self.tokenizer else None
        datamodule = self.trainer.datamodule if self._trainer else None
        if isinstance(datamodule, ImageTextDataModule):  # evaluation warns on other data
            checkpoint["data_identity"] = datamodule.identity()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("tokenizer"):
            self.tokenizer = BPETokenizer.from_state(checkpoint["tokenizer"])
