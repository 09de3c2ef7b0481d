"""Wall time per named phase of a loop (benchmarks break the KRR-ST outer step down with it)."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch


class PhaseTimer:
    """``with timer("teacher"): ...`` adds the block's wall time to ``totals["teacher"]``.
    On CUDA it synchronises around each block, so the times are the block's own."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.totals: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] += time.perf_counter() - start

    def reset(self) -> None:
        self.totals.clear()


class NoTimer:
    """The default: phases cost nothing (no synchronisation)."""

    def __call__(self, name: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


NO_TIMER = NoTimer()
