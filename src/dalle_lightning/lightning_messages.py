"""Lightning's console messages, once each and without advertisements.

The `lightning` package gives its logger a console handler of its own when it is imported, and
its messages also reach the root logger, which Hydra gives a console and a file handler: each
of Lightning's lines ("GPU available: ...", "Restoring states from ...") was printed twice. With
`route_lightning_messages()` they go through Hydra's handlers alone: printed once, in the run's
format, and kept in the run's log file as before. Two messages that say nothing about the run
are dropped: Lightning's tip to install litlogger (printed by every `Trainer`), and torch's
FutureWarning about `LeafSpec`, which Lightning's own code triggers (nothing a user can change).
Everything else Lightning logs or warns is kept.
"""

from __future__ import annotations

import logging
import re
import warnings

# the loggers the lightning package may give a console handler of its own when imported
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
TIP_PREFIX = "💡 Tip:"


class DropTips(logging.Filter):
    """Drops Lightning's advertisements ("💡 Tip: ... try installing litlogger ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP_PREFIX)


def route_lightning_messages() -> None:
    """Lightning's records go to the root logger's handlers alone (once it has any: under Hydra
    it does; without, Lightning keeps its own console handler), minus its tips; torch's
    `LeafSpec` FutureWarning is ignored. Idempotent; call it after importing Lightning."""
    if logging.getLogger().handlers:
        for name in LIGHTNING_LOGGERS:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropTips) for f in logger.filters):
            logger.addFilter(DropTips())
    warnings.filterwarnings(
        "ignore",
        message=re.escape("`isinstance(treespec, LeafSpec)` is deprecated"),
        category=FutureWarning,
    )
