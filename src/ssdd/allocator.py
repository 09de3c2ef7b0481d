"""Keep freed memory inside the process, so training steps do not page-fault their tensors back.

glibc's malloc returns freed memory at the top of its heap to the OS once more than a threshold is
free there, and serves blocks above another threshold with ``mmap`` (both thresholds adapt, but
stay small). A training loop frees and re-allocates the same activations every step, so each step's
tensors are fresh pages that the kernel must fault in and zero. On a 2-core EPYC a demo fine-tune
step (ConvNet, batch 64, bf16) made ~1,800 minor page faults and spent 4.1 ms of its 23.7 ms in the
kernel; with the settings below it made 3 and took 19.5 ms (``benchmarks/allocator.py``).
PyTorch's CPU performance guides get this by preloading jemalloc or tcmalloc; here glibc is told
with ``mallopt``, which works after start-up.

Blocks up to 32 MiB (glibc's largest mmap threshold) come from the heap, and the heap is never
trimmed; larger blocks keep glibc's behaviour: mapped when allocated, returned when freed. Keeping
those too (no mmap at all) made the paper's outer step 8 % faster still in fp32 (16.6 s against
18.0 s, different runs), but the heap then grows well past the live peak (torch asks for 64-byte
aligned blocks, which a hole of exactly the old size cannot serve): the m = 10,000 step went from
5.8 GB resident to over 24 GB and was killed. The cost that stays: the process keeps its peak of
small blocks until it exits.

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
_M_MMAP_THRESHOLD = -3  # blocks of at least this size are served by mmap (and unmapped when freed)
_LARGEST_MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for it on 64-bit systems
_NEVER_TRIM = 2**31 - 1  # the largest value mallopt takes (an int)


def keep_freed_memory() -> bool:
    """Serve blocks up to 32 MiB from the heap and never shrink it (glibc only; elsewhere a no-op).

    Returns whether glibc took both settings."""
    if os.environ.get("SSDD_MALLOC", "").lower() == "system":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        took = (libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD) == 1
                and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1)
    except (OSError, AttributeError):
        return False
    if not took:
        log.debug("mallopt refused the allocator settings; glibc defaults kept")
    return took
