"""Does the prior draw what its captions say, while it trains? (the built-in shapes only)

At every validation of a prior (`DalleModule`) on the built-in shapes, one image is sampled
for each of `num_captions` val captions (colour-shape pairs seen in training) and as many
held-out captions (pairs never seen), with the sampling settings the checkpoint carries, and
scored by the attribute checker: `val/attributes_seen` and `val/attributes_heldout`, in the
loggers and, from the last validation, in metrics.json. A prior that lands on a poor run shows
it here, without a separate `evaluate.py task=attributes` (docs/results.md).

The ranks split the captions and add up their matches, so every rank logs the same value (a
monitor can use it). Sampling draws from its own seeded generator, and the StepSeed callback
re-seeds every training step, so training is the same with or without this check. Not run:
during the sanity check, for other modules or datasets (no attribute records), and under
FSDP2 (each sampled code would all-gather every block; evaluate the consolidated checkpoint).
`evaluate.py task=attributes` stays the reference: 512 captions, the 0.5 one/two-object mix of
the test split, where the val split here has this run's mix (0.7 under data_mix/dalle_shapes).
With evaluate.py's seed (1234, the default here too), `evaluate.py task=attributes
num_captions=128 dataset.two_object_prob=0.7 ckpt_path=<run>/checkpoints/last.ckpt` draws the
held-out images of the last validation again (one process; ranks split the captions).

When training ends, a last check below `warn_seen_below` / `warn_heldout_below` (configured
85% / 70%: the main job's pass mark, 90% / 70% in `task=attributes`, less the few points
the val split's harder mix costs seen captions; None: no warning) logs a warning that says
what to do: on the shapes a default-recipe prior that ends that low is a poor run, which more
steps or other sampling did not rescue and another seed did (docs/results.md). 128 captions
resolve about +-4 points, so a run near a mark may warn and still pass `task=attributes`, or
pass the check and fall just short there; the seen mark suits the default 0.7 two-object mix.
"""

from __future__ import annotations

import logging
import time

import lightning.pytorch as pl
import torch

from dalle_lightning.config import require_float, require_int
from dalle_lightning.data.shapes import ShapesDataModule
from dalle_lightning.evaluation.attribute_accuracy import generated_matches
from dalle_lightning.modules.dalle_module import DalleModule
from dalle_lightning.modules.fsdp2 import sharded

log = logging.getLogger(__name__)

SPLITS = {"seen": "val", "heldout": "heldout"}


class AttributeAccuracy(pl.Callback):
    def __init__(
        self,
        num_captions: int = 128,
        seed: int = 1234,
        batch_size: int = 64,
        warn_seen_below: float | None = None,
        warn_heldout_below: float | None = None,
    ):
        require_int("num_captions", num_captions, 1)
        require_int("batch_size", batch_size, 1)
        require_int("seed", seed, 0)
        for field, value in (
            ("warn_seen_below", warn_seen_below),
            ("warn_heldout_below", warn_heldout_below),
        ):
            if value is not None:
                require_float(field, value, 0.0, 1.0)
        self.num_captions, self.seed, self.batch_size = num_captions, seed, batch_size
        self.marks = {"seen": warn_seen_below, "heldout": warn_heldout_below}
        self.last: dict[str, float] = {}  # the last check's accuracies, by split name
        self.last_step = self.last_captions = 0
        self._said_why_not = False

    def _shapes(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> ShapesDataModule | None:
        """The shapes datamodule behind a prior's token batches, or None (and why, once)."""
        images = getattr(trainer.datamodule, "images", None)
        why = None
        if not isinstance(pl_module, DalleModule):
            return None  # stage 1 and CLIP: nothing to say
        if not isinstance(images, ShapesDataModule):
            why = "the data is not the built-in shapes (no attribute records)"
        elif sharded(pl_module.model.prior):
            why = "the prior is sharded (FSDP2): evaluate the consolidated checkpoint"
        if why is None:
            return images
        if not self._said_why_not:
            log.info("attribute accuracy not measured while training: %s", why)
            self._said_why_not = True
        return None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (shapes := self._shapes(trainer, pl_module)) is None:
            return
        started = time.monotonic()
        shapes.setup()
        model = pl_module.model
        rank, world = trainer.global_rank, trainer.world_size
        n = min(self.num_captions, *(len(shapes.datasets[s]) for s in SPLITS.values()))
        counts = []
        for split in SPLITS.values():
            mine = range(rank, n, world)  # the ranks split the captions
            matches = generated_matches(
                model, shapes.datasets[split], mine, model.sampling, self.seed, self.batch_size
            )
            counts.append(float(matches))
        total = trainer.strategy.reduce(
            torch.tensor(counts, device=pl_module.device), reduce_op="sum"
        )
        self.last = {name: float(t) / n for name, t in zip(SPLITS, total, strict=True)}
        self.last_step, self.last_captions = trainer.global_step, n
        # equal on every rank: the mean is it
        pl_module.log_dict({f"val/attributes_{k}": v for k, v in self.last.items()}, sync_dist=True)
        log.info(
            "step %d: attributes seen %.1f%%, held-out %.1f%% (%d captions each, %.1f s)",
            trainer.global_step,
            100 * self.last["seen"],
            100 * self.last["heldout"],
            n,
            time.monotonic() - started,
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # only about the weights training ends with (not a check before a time limit's stop)
        final = trainer.global_step == self.last_step
        if final and trainer.is_global_zero and (message := self.verdict()) is not None:
            log.warning(message)

    def verdict(self) -> str | None:
        """The warning for a last check below its marks, or None (no check, or at the marks)."""
        low = [
            f"{'held-out' if name == 'heldout' else name} {100 * self.last[name]:.1f}% "
            f"(below {100 * mark:.0f}%)"
            for name, mark in self.marks.items()
            if mark is not None and name in self.last and self.last[name] < mark
        ]
        if not low:
            return None
        return (
            f"the last attribute check (step {self.last_step}, {self.last_captions} captions "
            f"each) read {', '.join(low)}: a prior of the default recipe that ends this low is "
            "a poor run, which more steps and other sampling did not rescue and another seed "
            "did (docs/results.md). Train another: python train.py model=dalle seed=<another> "
            "model.dvae_ckpt=<the dVAE path this run printed at its start>, and confirm with "
            "python evaluate.py task=attributes num_captions=512 (a shorter recipe such as "
            "experiment=shapes_quick is expected to end low)"
        )
