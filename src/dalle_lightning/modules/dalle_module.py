"""Training of the prior, stage 2 of DALL-E (Ramesh et al., 2021, sec. 2.2, B.2).

The dVAE is frozen and only decodes samples; training reads its codes from the token cache
(`data/token_cache.py`). Grid size and image vocabulary come from the dVAE checkpoint, never
from yaml. The text vocabulary is `text.vocab_size` BPE ids plus one pad id per position.

Optimisation as in the paper: AdamW (0.9, 0.96, eps 1e-8, weight decay 4.5e-2 on weight
matrices only: not on gains, biases or embeddings), gradient norm clipped at 4, learning
rate warmed up linearly, then halved whenever val/loss stops improving for
`plateau_patience` validations, at most `max_lr_halvings` times. Not in the paper, for
short runs that never plateau: `anneal_fraction` > 0 takes the learning rate down to 0 along
half a cosine over that last share of `trainer.max_steps`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torchvision.utils import make_grid, save_image

from dalle_lightning.config import (
    ConfigError,
    require,
    require_bool,
    require_float,
    require_int,
)
from dalle_lightning.data.datamodule import ImageTextDataModule
from dalle_lightning.data.token_cache import file_sha256
from dalle_lightning.data.token_datamodule import TokenDataModule
from dalle_lightning.models.dalle import DALLE
from dalle_lightning.models.dvae import DVAE
from dalle_lightning.models.transformer import PriorConfig, PriorTransformer
from dalle_lightning.modules.losses import prior_loss
from dalle_lightning.modules.schedules import cosine_anneal, linear_warmup
from dalle_lightning.run_summary import latest_checkpoint
from dalle_lightning.sampling.generate import SAMPLING_DEFAULTS, blank_text, resolve_sampling
from dalle_lightning.text.tokenizer import BPETokenizer

log = logging.getLogger(__name__)

TEXT_FIELDS = {"vocab_size": 512, "text_seq_len": 32, "bpe_dropout": 0.1}


def _fields(group: str, given: dict | None, defaults: dict) -> dict:
    """`defaults` updated with `given`; an unknown key is a ConfigError naming it."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"{group}.{key}", given[key], f"not a field; {group} has " + ", ".join(defaults)
        )
    return {**defaults, **given}


def resolve_dvae_ckpt(dvae_ckpt: str | None, runs_dir: str) -> Path:
    if dvae_ckpt is not None:
        require(Path(dvae_ckpt).is_file(), "dvae_ckpt", dvae_ckpt, "an existing dVAE checkpoint")
        return Path(dvae_ckpt)
    found = latest_checkpoint(runs_dir, "train_dvae")
    require(
        found is not None,
        "dvae_ckpt",
        None,
        f"a dVAE checkpoint, and no finished dVAE run is under {runs_dir}/train_dvae: "
        "run `python train.py model=dvae` first, or pass model.dvae_ckpt=PATH",
    )
    log.info("dVAE: %s (the newest finished run; set model.dvae_ckpt=PATH to choose)", found)
    return found


class DalleModule(LightningModule):
    """Field names in errors are relative to the `model` config group."""

    VALIDATION_METRICS = ("val/loss", "val/text_loss", "val/image_loss")

    def __init__(
        self,
        net: dict,
        text: dict | None = None,
        dvae_ckpt: str | None = None,
        runs_dir: str = "logs",
        cache_dir: str = "logs/token_cache",
        optimizer: Callable | None = None,
        warmup_steps: int = 200,
        plateau_patience: int = 2,
        plateau_factor: float = 0.5,
        max_lr_halvings: int = 5,
        anneal_fraction: float = 0.0,
        text_loss_weight: float = 1 / 8,
        caption_dropout: float = 0.0,
        grad_clip_norm: float | None = 4.0,
        num_sample_captions: int = 8,
        sampling: dict | None = None,
        compile: bool = False,
    ):
        super().__init__()
        text = _fields("text", text, TEXT_FIELDS)
        sampling = _fields("sampling", sampling, SAMPLING_DEFAULTS)
        require_int("text.vocab_size", text["vocab_size"], 2)
        require_int("text.text_seq_len", text["text_seq_len"], 1)
        require_float("text.bpe_dropout", text["bpe_dropout"], 0.0, 1.0)
        require_int("warmup_steps", warmup_steps, 0)
        require_int("plateau_patience", plateau_patience, 0)
        require_float("plateau_factor", plateau_factor, 1e-6, 1.0)
        require_int("max_lr_halvings", max_lr_halvings, 0)
        require_float("anneal_fraction", anneal_fraction, 0.0, 1.0)
        require_float("text_loss_weight", text_loss_weight, 0.0, 1.0)
        require_float("caption_dropout", caption_dropout, 0.0, 1.0)
        if grad_clip_norm is not None:
            require_float("grad_clip_norm", grad_clip_norm, 1e-12)
        require_int("num_sample_captions", num_sample_captions, 0)
        require_bool("compile", compile)
        try:  # also refuses guidance (cond_scale != 1) without caption dropout
            resolve_sampling(sampling, {}, guidance_trained=caption_dropout > 0)
        except ConfigError as err:
            raise err.at("sampling") from None
        net = dict(net)
        if net.get("backend") == "flex" and not torch.cuda.is_available():
            raise ConfigError(
                "net.backend", "flex", "sdpa on CPU (FlexAttention has no CPU backward)"
            )
        dvae_path = resolve_dvae_ckpt(dvae_ckpt, runs_dir)
        try:
            dvae = DVAE.from_checkpoint(dvae_path)
        except RuntimeError as err:
            raise ConfigError("dvae_ckpt", str(dvae_path), f"a dVAE checkpoint ({err})") from None
        try:
            config = PriorConfig(
                text_vocab=text["vocab_size"],
                text_seq_len=text["text_seq_len"],
                image_vocab=dvae.vocab_size,
                grid_size=dvae.grid_size,
                **net,
            )
        except ConfigError as err:
            raise err.at("net") from None
        except TypeError as err:
            raise ConfigError("net", net, f"fields of PriorConfig only ({err})") from None
        self.save_hyperparameters(ignore=["optimizer"])
        self.hparams.update(dvae_ckpt=str(dvae_path), text=text, sampling=sampling)
        self.model = DALLE(PriorTransformer(config), dvae, None, sampling, caption_dropout)
        self.optimizer = optimizer
        self.dvae_sha256 = file_sha256(dvae_path)
        self.lr_halvings, self._best_val, self._bad_validations = 0, float("inf"), 0
        self._sample_captions: list[str] = []
        self._val_total = torch.zeros(2)

    def configure_model(self) -> None:
        if self.hparams.compile:  # the teacher-forced forward; sampling runs eagerly
            self.model.prior.compile()  # in place: the state dict keeps its keys

    # data ----------------------------------------------------------------------------------
    def token_datamodule(self, images: ImageTextDataModule) -> TokenDataModule:
        """Stage-2 batches over `images`: cached codes of this module's dVAE, BPE text."""
        text = self.hparams.text
        size, trained_at = images.identity().get("image_size"), self.model.dvae.config.image_size
        require(
            size in (None, trained_at),
            "dataset.image_size",
            size,
            f"{trained_at}, the size the dVAE was trained at (its grid is the prior's)",
        )
        return TokenDataModule(
            images,
            self.model.dvae,
            self.dvae_sha256,
            self.hparams.cache_dir,
            text["vocab_size"],
            text["text_seq_len"],
            text["bpe_dropout"],
            tokenizer=self.model.tokenizer,
        )

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if isinstance(datamodule, TokenDataModule):
            if self.model.tokenizer is None:
                self.model.tokenizer = datamodule.tokenizer
            n = self.hparams.num_sample_captions
            self._sample_captions = datamodule.split_tokens("val")["captions"][:n] if n else []

    @rank_zero_only
    def on_fit_start(self) -> None:
        if self.model.tokenizer is not None:
            self.model.tokenizer.save(Path(self.trainer.default_root_dir) / "tokenizer.json")

    # objective -----------------------------------------------------------------------------
    def _losses(self, batch: dict, stage: str) -> Tensor:
        out = self.model.prior(batch["text"], batch["codes"])
        loss, text_loss, image_loss = prior_loss(
            out.text_logits,
            out.image_logits,
            batch["text"],
            batch["codes"],
            self.hparams.text_loss_weight,
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

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        p = self.hparams.caption_dropout
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
        if count > 0:
            self._plateau_update(float(total / count))
        self.log("train/lr_halvings", float(self.lr_halvings))
        if self._sample_captions:
            self._log_samples()

    # learning rate: linear warm-up, then halve on plateaus ---------------------------------
    def _plateau_update(self, val_loss: float) -> None:
        best = self._best_val
        if not math.isfinite(best) or val_loss < best - 1e-4 * abs(best):  # improved
            self._best_val, self._bad_validations = val_loss, 0
            return
        self._bad_validations += 1
        if self._bad_validations > self.hparams.plateau_patience:
            if self.lr_halvings < self.hparams.max_lr_halvings:
                self.lr_halvings += 1
                log.info("val/loss plateaued: learning rate x %s", self.hparams.plateau_factor)
            self._bad_validations = 0

    def lr_factor(self, step: int, max_steps: int = 0) -> float:
        """Warm-up ramp x plateau halvings x, over the last `anneal_fraction` of `max_steps`,
        half a cosine down to 0 (off when either is 0)."""
        factor = linear_warmup(step, self.hparams.warmup_steps)
        factor *= self.hparams.plateau_factor**self.lr_halvings
        anneal = round(self.hparams.anneal_fraction * max_steps)
        if anneal > 0:
            factor *= cosine_anneal(step - (max_steps - anneal), 1.0, 0.0, anneal)
        return factor

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
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(self.lr_factor, max_steps=max_steps)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        clip = gradient_clip_val if gradient_clip_val is not None else self.hparams.grad_clip_norm
        if clip:
            self.clip_gradients(optimizer, clip, gradient_clip_algorithm or "norm")

    # samples -------------------------------------------------------------------------------
    @torch.no_grad()
    def _log_samples(self) -> None:
        """Fixed val captions: their images through the dVAE (top) and sampled images."""
        captions = self._sample_captions
        tokens = self.trainer.datamodule.split_tokens("val")
        codes = tokens["codes"][: len(captions)].long().to(self.device)
        real = self.model.dvae.decode(codes)
        fake = self.model.generate(captions, 1, seed=0, **self.hparams.sampling).to(real.device)
        self._save_grid(torch.cat([real, fake]).float().cpu(), captions)

    @rank_zero_only
    def _save_grid(self, images: Tensor, captions: list[str]) -> None:
        grid = make_grid(images.clamp(0, 1), nrow=len(captions), padding=2, pad_value=0.5)
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/samples", grid, self.global_step)
        out_dir = Path(self.trainer.default_root_dir) / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        save_image(grid, out_dir / f"step_{self.global_step:07d}.png")
        (out_dir / "captions.txt").write_text("\n".join(captions) + "\n")

    # checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint.update(self.model.checkpoint_extras())
        checkpoint["lr_plateau"] = [self.lr_halvings, self._best_val, self._bad_validations]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("tokenizer"):  # the run's own tokenizer, also for the data loaders
            self.model.tokenizer = BPETokenizer.from_state(checkpoint["tokenizer"])
            datamodule = self.trainer.datamodule if self._trainer else None
            if isinstance(datamodule, TokenDataModule):
                datamodule.tokenizer = self.model.tokenizer
        if "lr_plateau" in checkpoint:
            self.lr_halvings, self._best_val, self._bad_validations = checkpoint["lr_plateau"]
