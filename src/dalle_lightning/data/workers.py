"""How data-loader workers start: forked from a fork server, never from the trainer itself.

A process whose other threads run Python (under DDP: the process group's threads) cannot be
forked safely: the child copies a lock such a thread holds, and on CPython 3.11 it then hangs
for good in its after-fork reinit (`PyOS_AfterFork_Child`), with no error. Seen here: the
two-rank DDP run on shards hung in 2 of 11 runs (docs/reliability.md). A fork server is a fresh
process with one thread, started once per trainer process (fork + exec, which is safe); it
imports PRELOAD once and forks each worker from itself, so a worker starts in milliseconds
rather than re-importing torch as `spawn` would. CPython 3.14 made it the default on Linux
for this reason.

Workers are kept across epochs (`persistent_workers`), so each loader starts them once.
What a worker gets is pickled: datasets and collate functions are module-level classes and
functions (no lambdas). As with `spawn`, a script of your own that iterates these loaders
needs the `if __name__ == "__main__":` guard (train.py, evaluate.py and demo.py have it).
A worker's log records go to stderr (Python's last-resort handler), not to the run's log.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

PRELOAD = [
    "__main__",  # the entry script: its import does no work (train.py imports lazily)
    "dalle_lightning.data.datamodule",
    "dalle_lightning.data.token_datamodule",
    "dalle_lightning.data.web_datamodule",
]


def worker_options(num_workers: int, persistent: bool = True) -> dict[str, Any]:
    """DataLoader keyword arguments for `num_workers` workers (none: loaded in the caller)."""
    if num_workers == 0:
        return {"num_workers": 0}
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return {
        "num_workers": num_workers,
        "persistent_workers": persistent,
        "multiprocessing_context": context,
    }
