"""Per-step losses kept on the device and read back in batches.

Reading a CUDA loss every step (``loss.item()``, ``if not torch.isfinite(loss)``) makes the host wait
for the GPU at every step, so the GPU idles while the next step is launched. A loop records its 0-d
loss tensors in a :class:`StepLog` and reads them as floats every few steps, before each checkpoint
and at its end; its checks (finiteness) run at those reads, so a non-finite loss never reaches a
checkpoint. On the CPU a read costs nothing, so it reads every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Callable

import torch

from ssdd import live_log
from ssdd.errors import Stopped, UserError

READ_EVERY = 25  # GPU steps between reads of a loop's losses to the host (each read waits for the device once)


def read_every(device: torch.device | str) -> int:
    """How many steps a :class:`StepLog` keeps on ``device`` before reading: 1 on the CPU, where a read
    costs nothing (so a CPU run checks each step as it ends), READ_EVERY elsewhere."""
    return 1 if torch.device(device).type == "cpu" else READ_EVERY


class StepLog:
    """A loop's per-step losses (and whatever else it checks per step), kept as 0-d device tensors and read
    to floats in batches: every :func:`read_every` steps, before a checkpoint (:meth:`read` in the state
    function) and at the end, with one ``torch.stack(...).tolist()`` instead of one ``.item()`` (a device
    sync) per step.

    ``add(step, tensors, info)`` records a step; at the read, ``finish(step, floats, info)`` gets that
    step's tensors as Python floats (the same floats ``.item()`` gives), checks them (finiteness: raise
    :class:`UserError` naming ``step``) and returns the value to keep. ``values`` (the list passed in, kept
    and appended to in place: a resumed run's losses) holds only read, checked floats, so checkpoints and
    artifacts hold plain floats, as before. On a GPU a non-finite loss is reported at the next read rather
    than at its step; a checkpoint never holds a state past it, since its read comes first and raises.

    ``tag`` names the kept value for the live log (:mod:`ssdd.live_log`, under the run's scope, at the
    step ``add`` was given); it is written once checked, as it becomes a float.
    """

    def __init__(self, values: list[float], finish: Callable[[int, list[float], Any], float],
                 device: torch.device | str, every: int | None = None, tag: str | None = None):
        self.values, self.finish, self.tag = values, finish, tag
        self.every = max(1, read_every(device) if every is None else every)
        self.pending: list[tuple[int, list[torch.Tensor], Any]] = []

    def __len__(self) -> int:
        return len(self.values) + len(self.pending)

    def add(self, step: int, tensors: list[torch.Tensor], info: Any = None) -> bool:
        """Record ``step``'s 0-d tensors (detached); True when this call read the batch."""
        self.pending.append((step, [t.detach() for t in tensors], info))
        if len(self.pending) >= self.every:
            self.read()
            return True
        return False

    def read(self) -> list[float]:
        """Read and check every pending step (one device sync); returns ``values``."""
        if self.pending:
            pending, self.pending = self.pending, []
            floats = torch.stack([t.reshape(()) for _, ts, _ in pending for t in ts]).tolist()
            pos = 0
            for step, ts, info in pending:
                self.values.append(self.finish(step, floats[pos:pos + len(ts)], info))
                pos += len(ts)
                if self.tag is not None:
                    live_log.scalar(self.tag, self.values[-1], step)
        return self.values

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Around a loop: when it fails (say a solver on non-finite inputs), a non-finite loss still
        pending is the cause to report, so read them first and raise that UserError instead."""
        try:
            yield
        except (UserError, Stopped):
            raise
        except Exception as err:
            try:
                self.read()
            except UserError as bad:
                raise bad from err
            except Exception:  # the device itself failed: the original error says more
                pass
            raise
