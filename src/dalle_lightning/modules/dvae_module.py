"""Training of the dVAE, stage 1 of DALL-E (Ramesh et al., 2021, sec. 2.1, A.2, A.3).

Objective per image (the negative ELB with the KL weight beta):
    loss = [ NLL(x | z) + beta * KL(q_phi(z|x) || uniform) ] / (C * H * W)
with z a Gumbel-softmax relaxation of q_phi(z|x) at temperature tau. Dividing by the number
of subpixels makes the effective KL weight beta / 192 at 256 px, as in the paper.
Optionally (not in the paper; `usage_weight` > 0) plus usage_weight * KL(batch-average q_phi
|| uniform), which counters codebook collapse on small, simple data (`losses.code_usage_kl`).

Schedules (pure functions of the global step, so a resumed run continues them exactly):
beta 0 -> beta over `kl_warmup_steps`, tau 1 -> 1/16 over `temp_anneal_steps`, learning rate
cosine from its initial value to `lr_final_ratio` of it over `lr_decay_steps`, optionally
after a linear warm-up over `lr_warmup_steps` (not in the paper; see `schedules.linear_warmup`).

Not in the paper, optional: from step `decoder_only_from` on, the decoder trains alone on the
frozen encoder's argmax codes (`_decoder_step`), so that it renders the hard codes the prior
will produce (docs/results.md).

Validation uses hard (argmax) codes, the way the prior and generation will use the dVAE, and
the final beta, so val/loss is comparable across steps and runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor
from torchmetrics.image import PeakSignalNoiseRatio

from dalle_lightning.checkpoints import dvae_entries
from dalle_lightning.config import ConfigError
from dalle_lightning.models.dvae import DVAE, DVAEConfig, ResBlockGroup
from dalle_lightning.modules.fsdp2 import FSDP2Strategy, sharded
from dalle_lightning.modules.grids import log_grid
from dalle_lightning.modules.losses import (
    DVAELoss,
    code_usage_kl,
    kl_to_uniform,
    logit_laplace_nll,
    mse_nll,
)
from dalle_lightning.modules.schedules import DVAESchedule


class DVAEModule(LightningModule):
    """`stages.dvae_module` builds it from conf/model/dvae.yaml: `net` is the DVAEConfig, the
    flat keys are the fields of `DVAELoss` and `DVAESchedule` and the options below."""

    # what a checkpoint callback or a sweep can monitor (checked before training starts)
    VALIDATION_METRICS = (
        "val/loss",
        "val/nll",
        "val/kl",
        "val/psnr",
        "val/codebook_perplexity",
        "val/codebook_used",
    )

    def __init__(
        self,
        net: DVAEConfig,
        loss: DVAELoss = DVAELoss(),
        schedule: DVAESchedule = DVAESchedule(),
        optimizer: Callable | None = None,
        num_logged_images: int = 8,
        channels_last: bool = True,
        compile: bool = False,
    ):
        """`optimizer`: a partial AdamW (conf's `_partial_: true`), finished with the
        parameters in `configure_optimizers`; `num_logged_images` originals vs reconstructions
        at every validation; `channels_last` memory layout (faster convolutions on CPU and
        GPU); `compile` the encoder and decoder."""
        super().__init__()
        # hyper_parameters in the layout of conf/model/dvae.yaml (stages.dvae_module reads it)
        options = dict(
            num_logged_images=num_logged_images, channels_last=channels_last, compile=compile
        )
        self.save_hyperparameters(
            {"net": asdict(net), **asdict(loss), **asdict(schedule), **options}
        )
        self.loss, self.schedule = loss, schedule
        self.num_logged_images = num_logged_images
        self.channels_last = channels_last
        self.compile_net = compile  # `compile` is nn.Module's method
        self.net = DVAE(net)  # the attribute name is the checkpoint's weight prefix
        self.optimizer = optimizer
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.test_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self._code_counts: Tensor | None = None
        self._logged_batch: Tensor | None = None

    def configure_model(self) -> None:
        strategy = self._trainer.strategy if self._trainer is not None else None
        fsdp2 = isinstance(strategy, FSDP2Strategy)
        # faster convolutions on CPU (oneDNN) and GPU (docs/speed.md); FSDP2 shards only
        # contiguous weights, so under it the images alone are channels-last
        if self.channels_last and not fsdp2:
            self.net.to(memory_format=torch.channels_last)
        if fsdp2 and not sharded(self.net):
            net = self.net
            groups = [m for m in net.modules() if isinstance(m, ResBlockGroup)]
            islands = [net.encoder.blocks.output, net.decoder.blocks.input]  # models/fp32.py
            # evaluation runs the encoder and decoder through these, not through forward
            strategy.shard(net, groups, islands, methods=("logits", "decode_stats"))
        if self.compile_net:  # in place: the state dict keeps its keys; tau stays outside
            self.net.encoder.compile()
            self.net.decoder.compile()

    def _images(self, batch: dict) -> Tensor:
        images = batch["image"]
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    # objective -----------------------------------------------------------------------------
    def _terms(self, stats: Tensor, logits: Tensor, images: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstruction NLL and KL, both per image and per subpixel: (B,), (B,)."""
        if self.loss.recon_loss == "logit_laplace":
            nll = logit_laplace_nll(stats, images)
        else:
            nll = mse_nll(DVAE.mean_image(stats, clamp=False), images, self.loss.mse_sigma)
        subpixels = images[0].numel()  # C * H * W
        return nll / subpixels, kl_to_uniform(logits) / subpixels

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images = self._images(batch)
        step = self.global_step
        if self.schedule.decoder_only(step):
            return self._decoder_step(images)
        tau, beta = self.schedule.tau(step), self.schedule.beta(step, self.loss.beta)
        out = self.net(images, tau=tau)
        nll, kl = self._terms(out.stats, out.logits, images)
        loss = (nll + beta * kl).mean()
        if self.loss.usage_weight:
            usage = code_usage_kl(out.logits)
            loss = loss + self.loss.usage_weight * usage
            self.log("train/code_usage_kl", usage)
        self.log_dict({"train/loss": loss, "train/nll": nll.mean(), "train/kl": kl.mean()})
        self.log_dict({"train/tau": tau, "train/beta": beta})
        return loss

    def _decoder_step(self, images: Tensor) -> Tensor:
        """The decoder-only phase (`DVAESchedule.decoder_only_from`): the frozen encoder's
        argmax codes, decoded; only the decoder gets gradients (AdamW skips the encoder)."""
        with torch.no_grad():
            logits = self.net.logits(images)
        nll, _ = self._terms(self._decode_codes(logits.argmax(1), logits.dtype), logits, images)
        loss = nll.mean()
        self.log_dict({"train/loss": loss, "train/nll": loss})
        return loss

    def _decode_codes(self, codes: Tensor, dtype: torch.dtype) -> Tensor:
        """Decoder statistics of hard codes (B, h, w), as one-hot inputs of `dtype`."""
        z = F.one_hot(codes, self.net.vocab_size).permute(0, 3, 1, 2).to(dtype)
        return self.net.decode_stats(z)

    def _eval_step(self, images: Tensor, psnr: PeakSignalNoiseRatio, stage: str) -> Tensor:
        logits = self.net.logits(images)
        codes = logits.argmax(1)  # (B, h, w)
        stats = self._decode_codes(codes, logits.dtype)
        reconstruction = DVAE.mean_image(stats)
        nll, kl = self._terms(stats, logits, images)
        loss = (nll + self.loss.beta * kl).mean()
        psnr.update(reconstruction.float(), images.float())
        counts = torch.bincount(codes.flatten(), minlength=self.net.vocab_size)
        self._code_counts = counts if self._code_counts is None else self._code_counts + counts
        batch_size = images.shape[0]
        self.log_dict(
            {f"{stage}/loss": loss, f"{stage}/nll": nll.mean(), f"{stage}/kl": kl.mean()},
            batch_size=batch_size,
            sync_dist=True,
            prog_bar=stage == "val",
        )
        self.log(f"{stage}/psnr", psnr, batch_size=batch_size, prog_bar=stage == "val")
        return reconstruction

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = self._images(batch)
        reconstruction = self._eval_step(images, self.val_psnr, "val")
        if batch_idx == 0 and self.num_logged_images:
            n = self.num_logged_images
            self._logged_batch = torch.cat([images[:n], reconstruction[:n]]).detach()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(self._images(batch), self.test_psnr, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_codebook_usage("val")
        if self._logged_batch is not None and not self.trainer.sanity_checking:
            pairs = self._logged_batch  # originals (top row), reconstructions (bottom row)
            log_grid(self, pairs, len(pairs) // 2, "val/reconstructions", "reconstructions")
        self._logged_batch = None

    def on_test_epoch_end(self) -> None:
        self._log_codebook_usage("test")

    def _log_codebook_usage(self, stage: str) -> None:
        """Perplexity exp(H(p)) of the code histogram over the epoch, and the fraction used."""
        if self._code_counts is None:
            return
        counts = self.trainer.strategy.reduce(self._code_counts.float(), reduce_op="sum")
        self._code_counts = None
        p = counts / counts.sum().clamp_min(1)
        entropy = -(p * p.clamp_min(1e-12).log()).sum()
        self.log(f"{stage}/codebook_perplexity", entropy.exp())
        self.log(f"{stage}/codebook_used", (counts > 0).float().mean())

    # optimisation --------------------------------------------------------------------------
    def configure_optimizers(self):
        params = self.trainer.model.parameters()
        optimizer = (
            self.optimizer(params) if self.optimizer is not None else torch.optim.AdamW(params)
        )
        max_steps, start = self.trainer.max_steps, self.schedule.decoder_only_from
        # with a decoder-only phase inside the run, the cosine ends where the phase starts
        phase_in_run = start is not None and max_steps is not None and 0 < start < max_steps
        decay_steps = self.schedule.lr_decay_steps or (start if phase_in_run else max_steps)
        if decay_steps is None or decay_steps <= 0:
            raise ConfigError(
                "model.lr_decay_steps",
                self.schedule.lr_decay_steps,
                "an integer >= 1, or null with trainer.max_steps > 0",
            )
        factor = functools.partial(
            self.schedule.lr_factor, decay_steps=decay_steps, max_steps=max_steps
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # lets `DVAE.from_checkpoint` rebuild the model from this file alone
        checkpoint.update(dvae_entries(asdict(self.net.config)))
