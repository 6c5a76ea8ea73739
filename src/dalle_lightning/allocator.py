"""glibc malloc settings for CPU training: keep freed memory for the next step.

PyTorch's CPU tensors come from the C allocator. glibc serves blocks above its mmap threshold
(128 KiB, rising on its own only to the largest block freed so far) with fresh `mmap` pages
and returns the top of the heap to the system when more than 128 KiB of it is free, so a
training step that allocates and frees the same activations every time pays for page faults
and zeroed pages every time. Serving blocks up to 32 MiB (the upper limit `man mallopt` gives)
from the heap and never trimming it lets each step reuse the last one's memory: the dVAE's
64 px training step ~13% faster on this project's 2-core machine (docs/speed.md). The cost is
that the process keeps its peak heap until it exits, as PyTorch's GPU caching allocator does.
PyTorch's CPU tuning guide reaches the same end with jemalloc or tcmalloc loaded through
LD_PRELOAD; this needs nothing installed. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, mallopt(3)'s limit
TRIM_THRESHOLD = 2**31 - 1  # an int: never trim in practice


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (module docstring); True if both were set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        done = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and done
    except (OSError, AttributeError):
        return False
    if not done:
        log.debug("glibc refused the malloc thresholds; allocation stays as it is")
    return done
