"""Per-step losses kept on the device and read back in batches.

Reading a CUDA loss every step (``loss.item()``, ``if not torch.isfinite(loss)``) makes the host
wait for the GPU at every step, so the GPU idles while the next step is launched. A loop appends
its 0-d loss tensors here and reads them as floats every ``every`` steps, before each checkpoint
and at its end; the finiteness check runs at those reads, so a non-finite loss never reaches a
checkpoint. On the CPU a read costs nothing, so it reads every step (``every=1``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch


class LossLog:
    """The floats of a loop's losses so far, with the newest still on the device until read."""

    def __init__(self, values: list[float] | None = None, device: torch.device | str = "cpu", every: int = 50,
                 on_nonfinite: Callable[[int, float], None] | None = None):
        """``on_nonfinite(step, value)`` is called (it should raise) for the first non-finite loss read;
        ``step`` counts from 1, as the loops' steps do."""
        self.values: list[float] = list(values or [])
        self.every = 1 if torch.device(device).type == "cpu" else max(1, every)
        self.on_nonfinite = on_nonfinite
        self._pending: list[torch.Tensor] = []

    def append(self, loss: torch.Tensor) -> bool:
        """Keep one step's loss; True when it was read now (the floats are up to date)."""
        self._pending.append(loss.detach().reshape(()))
        if len(self._pending) >= self.every:
            self.read()
            return True
        return False

    def read(self) -> list[float]:
        """Every loss as a float (one device-to-host copy for all pending ones), checked for finiteness."""
        if self._pending:
            start = len(self.values)
            new = torch.stack([t.double() for t in self._pending]).tolist()  # fp64: exactly .item()'s floats
            self._pending.clear()
            self.values.extend(new)
            for i, value in enumerate(new):
                if not math.isfinite(value) and self.on_nonfinite is not None:
                    self.on_nonfinite(start + i + 1, value)
        return self.values

    def __len__(self) -> int:
        return len(self.values) + len(self._pending)

    @property
    def last(self) -> float | None:
        return self.values[-1] if self.values else None
