"""Training of the prior, stage 2 of DALL-E (Ramesh et al., 2021, sec. 2.2, B.2).

`stages.prior_stage` assembles it: the frozen dVAE (loaded once from its checkpoint), the
prior's config (grid size and image vocabulary from that dVAE, text sizes from `model.text`),
and batches of cached dVAE codes (`data/token_datamodule.py`), so the training step never
runs the dVAE encoder. The BPE tokenizer is learned from the training captions by that
datamodule in `prepare_data` (global rank 0 first, the others wait, so all ranks share one
set of ids) and handed to the model in `setup` when none was given.

Optimisation as in the paper: AdamW (0.9, 0.96, eps 1e-8, weight decay 4.5e-2 on weight
matrices only: not on gains, biases or embeddings), gradient norm clipped, learning rate
warmed up linearly then halved on plateaus of val/loss (`schedules.PriorSchedule`).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn

from dalle_lightning.checkpoints import dalle_entries
from dalle_lightning.models.dalle import DALLE
from dalle_lightning.models.dvae import DVAE
from dalle_lightning.models.transformer import PriorConfig, PriorTransformer
from dalle_lightning.modules.fsdp2 import FSDP2Strategy, sharded
from dalle_lightning.modules.grids import log_grid
from dalle_lightning.modules.losses import PriorLoss, prior_loss
from dalle_lightning.modules.schedules import PlateauHalvings, PriorSchedule
from dalle_lightning.sampling.sampler import SamplingConfig, blank_text
from dalle_lightning.text.tokenizer import BPETokenizer

log = logging.getLogger(__name__)


class DalleModule(LightningModule):
    VALIDATION_METRICS = ("val/loss", "val/text_loss", "val/image_loss")

    def __init__(
        self,
        net: PriorConfig,
        dvae: DVAE,
        tokenizer: BPETokenizer | None = None,
        loss: PriorLoss = PriorLoss(),
        schedule: PriorSchedule = PriorSchedule(),
        sampling: SamplingConfig = SamplingConfig(),
        optimizer: Callable | None = None,
        num_sample_captions: int = 8,
        compile: bool = False,
    ):
        """`sampling`: what the validation sample grids use, saved with the checkpoint as the
        settings it was trained for; `num_sample_captions` val captions sampled at every
        validation; `compile` the prior's teacher-forced forward."""
        super().__init__()
        options = dict(num_sample_captions=num_sample_captions, compile=compile)
        self.save_hyperparameters(
            {
                "net": asdict(net),
                "sampling": asdict(sampling),
                **asdict(loss),
                **asdict(schedule),
                **options,
            }
        )
        self.loss, self.schedule = loss, schedule
        self.num_sample_captions, self.compile_prior = num_sample_captions, compile
        prior = PriorTransformer(net)
        # the attribute name is the checkpoint's weight prefix (checkpoints.py)
        self.model = DALLE(prior, dvae, tokenizer, sampling, loss.caption_dropout)
        self.optimizer = optimizer
        self.plateau = PlateauHalvings(schedule)
        self._sample_captions: list[str] = []
        self._val_total = torch.zeros(2)
        self._dtype_hooks: tuple[list, dict] | None = None  # on_train_start to the first batch

    def configure_model(self) -> None:
        prior = self.model.prior
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDP2Strategy) and not sharded(prior):
            # the frozen dVAE stays whole on every rank, outside the optimizer: it only decodes
            # sample grids, which are off under sharding (see _log_samples)
            heads = [prior.to_text_logits, prior.to_image_logits]  # fp32 islands
            strategy.shard(prior, prior.blocks, fp32_islands=heads)
        if self.compile_prior:  # the teacher-forced forward; sampling runs eagerly
            prior.compile()  # in place: the state dict keeps its keys

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule  # a TokenDataModule (stages.prior_stage)
        if self.model.tokenizer is None:
            self.model.tokenizer = datamodule.tokenizer
        n = self.num_sample_captions
        self._sample_captions = datamodule.split_tokens("val")["captions"][:n] if n else []

    def on_fit_start(self) -> None:
        expect_frozen_in_eval(self, "model.dvae")
        if self.trainer.is_global_zero and self.model.tokenizer is not None:
            self.model.tokenizer.save(Path(self.trainer.default_root_dir) / "tokenizer.json")

    # objective -----------------------------------------------------------------------------
    def _losses(self, batch: dict, stage: str) -> Tensor:
        out = self.model.prior(batch["text"], batch["codes"])
        loss, text_loss, image_loss = prior_loss(
            out.text_logits,
            out.image_logits,
            batch["text"],
            batch["codes"],
            self.loss.text_loss_weight,
        )
        evaluating = stage != "train"
        self.log_dict(
            {
                f"{stage}/loss": loss,
                f"{stage}/text_loss": text_loss,
                f"{stage}/image_loss": image_loss,
            },
            batch_size=batch["codes"].shape[0],
            prog_bar=stage != "test",
            sync_dist=evaluating,
        )
        return loss

    def on_train_start(self) -> None:
        """Log, once, the dtype the blocks compute in and the logits come out in (under
        16-mixed / bf16-mixed the heads stay fp32 islands: models/fp32.py)."""
        seen: dict[str, torch.dtype] = {}

        def record(name: str):
            def hook(_module, _inputs, output) -> None:
                value = output[1] if isinstance(output, tuple) else output  # image logits
                seen.setdefault(name, value.dtype)

            return hook

        prior = self.model.prior
        linear = next(m for m in prior.blocks[0].modules() if isinstance(m, nn.Linear))
        handles = [
            linear.register_forward_hook(record("blocks")),  # the residual stream is fp32
            prior.register_forward_hook(record("logits")),
        ]
        self._dtype_hooks = (handles, seen)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._dtype_hooks is None:
            return
        handles, seen = self._dtype_hooks
        for handle in handles:
            handle.remove()
        self._dtype_hooks = None
        log.info(
            "precision %s: blocks compute in %s, logits in %s",
            self.trainer.precision,
            seen.get("blocks"),
            seen.get("logits"),
        )

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        p = self.loss.caption_dropout
        if p > 0:  # blank captions teach the unconditional prior guidance needs
            text = batch["text"]
            blank = blank_text(self.model.prior, text.shape[0], text.device)
            drop = torch.rand(text.shape[0], device=text.device) < p
            batch = {**batch, "text": torch.where(drop[:, None], blank, text)}
        return self._losses(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = self._losses(batch, "val").detach()
        n = batch["codes"].shape[0]
        self._val_total = self._val_total + torch.stack([loss * n, loss.new_tensor(n)])

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._losses(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._val_total = torch.zeros(2, device=self.device)  # sum of loss x batch, images

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        # this epoch's val/loss, computed here: callback_metrics may still hold the last one
        total, count = self.trainer.strategy.reduce(self._val_total, reduce_op="sum")
        if count > 0 and self.plateau.update(float(total / count)):
            log.info("val/loss plateaued: learning rate x %s", self.schedule.plateau_factor)
        self.log("train/lr_halvings", float(self.plateau.halvings))
        if self._sample_captions and not sharded(self.model.prior):
            self._log_samples()

    # optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for module in self.trainer.model.modules():
            for name, param in module.named_parameters(recurse=False):
                if not param.requires_grad:
                    continue
                is_matrix = isinstance(module, nn.Linear) and name == "weight"
                (decay if is_matrix else no_decay).append(param)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = self.optimizer(groups) if self.optimizer else torch.optim.AdamW(groups)
        max_steps = max(self.trainer.max_steps, 0)  # -1 (epochs only): no anneal, config check
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor(max_steps))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def lr_factor(self, max_steps: int) -> Callable[[int], float]:
        """The learning rate's factor at a step: the schedule's, with this run's halvings."""

        def factor(step: int) -> float:
            return self.schedule.lr_factor(step, self.plateau.halvings, max_steps)

        return factor

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        clip = gradient_clip_val if gradient_clip_val is not None else self.schedule.grad_clip_norm
        if clip:
            self.clip_gradients(optimizer, clip, gradient_clip_algorithm or "norm")

    # samples -------------------------------------------------------------------------------
    @torch.no_grad()
    def _log_samples(self) -> None:
        """Fixed val captions: their images through the dVAE (top) and sampled images.
        Not under FSDP2: each sampled token would all-gather every block; sample from the
        consolidated checkpoint instead (docs/scaling.md)."""
        captions = self._sample_captions
        tokens = self.trainer.datamodule.split_tokens("val")
        codes = tokens["codes"][: len(captions)].long().to(self.device)
        real = self.model.dvae.decode(codes).float().cpu()
        fake = self.model.generate(captions, 1, seed=0, sampling=self.model.sampling)
        path = log_grid(self, torch.cat([real, fake]), len(captions), "val/samples", "samples")
        if path is not None:  # rank 0
            (path.parent / "captions.txt").write_text("\n".join(captions) + "\n")

    # checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        model = self.model
        tokenizer = model.tokenizer.state() if model.tokenizer is not None else None
        checkpoint.update(
            dalle_entries(
                asdict(model.prior.config),
                asdict(model.dvae.config),
                tokenizer,
                asdict(model.sampling),
                model.caption_dropout,
            )
        )
        checkpoint["lr_plateau"] = self.plateau.state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("tokenizer"):  # the run's own tokenizer, also for the data loaders
            self.model.tokenizer = BPETokenizer.from_state(checkpoint["tokenizer"])
            datamodule = self.trainer.datamodule if self._trainer else None
            if datamodule is not None:
                datamodule.tokenizer = self.model.tokenizer
        if "lr_plateau" in checkpoint:
            self.plateau.load(checkpoint["lr_plateau"])


def expect_frozen_in_eval(module: nn.Module, frozen: str) -> None:
    """Lightning warns, as fitting starts, about every module in eval mode. The frozen dVAE's
    are, by design: it only encodes the token cache and decodes sample grids, and it has no
    dropout or normalisation whose mode would matter. When every module in eval mode is under
    `frozen`, that warning is silenced for their count alone, so a prior module left in eval
    mode still gets it (with a larger count)."""
    in_eval = [name for name, sub in module.named_modules() if not sub.training]
    if in_eval and all(name == frozen or name.startswith(frozen + ".") for name in in_eval):
        warnings.filterwarnings(
            "ignore",
            message=re.escape(f"Found {len(in_eval)} module(s) in eval mode"),
            category=PossibleUserWarning,
        )
