"""Training of the in-project reranker: `python train.py model=clip` (see `models/clip.py`).

Images and captions come straight from an image-caption datamodule (the training split draws
one caption per image); captions become the project's BPE ids, the same tokenizer file the
prior of that dataset uses (`stages.clip_stage` loads or learns it). Objective: symmetric
InfoNCE over the batch with a learned temperature. Validation logs retrieval R@1 both ways
over the whole split. AdamW, linear warm-up, cosine decay (`schedules.ClipSchedule`).

The checkpoint carries the CLIP's config, the tokenizer and the identity of the data it was
trained on (`checkpoints.clip_entries`), so `sampling/rerank.py` rebuilds it from the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from dalle_lightning.checkpoints import clip_entries
from dalle_lightning.config import ConfigError
from dalle_lightning.models.clip import ClipConfig, ContrastiveModel, contrastive_loss, recall_at_1
from dalle_lightning.modules.schedules import ClipSchedule
from dalle_lightning.text.tokenizer import BPETokenizer


class ClipModule(LightningModule):
    VALIDATION_METRICS = ("val/loss", "val/r1_image_to_text", "val/r1_text_to_image")

    def __init__(
        self,
        net: ClipConfig,
        tokenizer: BPETokenizer,
        schedule: ClipSchedule = ClipSchedule(),
        optimizer: Callable | None = None,
        trained_on: dict | None = None,
    ):
        """`trained_on`: the identity of the training data, saved in the checkpoint (an
        evaluation on other data warns)."""
        super().__init__()
        self.save_hyperparameters(
            {"net": asdict(net), "vocab_size": tokenizer.vocab_size, **asdict(schedule)}
        )
        self.net = ContrastiveModel(net)  # the attribute name is the checkpoint's weight prefix
        self.tokenizer, self.schedule, self.trained_on = tokenizer, schedule, trained_on
        self.optimizer = optimizer
        self._val: list[tuple[Tensor, Tensor, list[str]]] = []

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
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self.schedule.lr_factor(step, total)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        entries = clip_entries(asdict(self.net.config), self.tokenizer.state(), self.trained_on)
        checkpoint.update(entries)
