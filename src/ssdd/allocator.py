"""Keep freed memory inside the process, so training steps do not page-fault their tensors back.

glibc's malloc serves large blocks (activations, gradients) with ``mmap`` and hands them back to
the OS when they are freed; the next step's identical tensors are then fresh pages that the kernel
must fault in and zero. On a 2-core EPYC a demo fine-tune step (ConvNet, batch 64, bf16) made
~1,800 minor page faults and spent ~4 ms of its ~22 ms in the kernel; with freed blocks kept it
made none (``benchmarks/results/README.md``). This is what PyTorch's CPU performance guides get by
preloading jemalloc or tcmalloc; here glibc is told the same with ``mallopt``, which works after
start-up. The cost: the process keeps its peak memory until it exits instead of returning it, and
the heap can grow past the live peak while freed holes settle (torch asks for 64-byte aligned
blocks, which a hole of exactly the old size cannot serve); the demo's pretrain and evaluate
stages peaked 4 % and 1 % higher in RSS.

The CLI calls :func:`keep_freed_memory` once per process; library users opt in themselves.
``SSDD_MALLOC=system`` leaves glibc's defaults alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger("ssdd")

_M_TRIM_THRESHOLD = -1  # glibc malloc.h: free memory at the heap's top is returned above this size
_M_MMAP_MAX = -4  # how many blocks may be served by mmap at once (0: none, all come from the heap)
_NEVER_TRIM = 2**31 - 1  # the largest value mallopt takes (an int)


def keep_freed_memory() -> bool:
    """Serve every block from the heap and never shrink it (glibc only; elsewhere a no-op).

    Returns whether glibc took both settings."""
    if os.environ.get("SSDD_MALLOC", "").lower() == "system":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        took = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1
    except (OSError, AttributeError):
        return False
    if not took:
        log.debug("mallopt refused the allocator settings; glibc defaults kept")
    return took
