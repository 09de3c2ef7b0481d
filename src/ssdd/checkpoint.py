"""Periodic checkpoints and resume, one helper for every long loop (teacher, distillation, prep
stages, fine-tunes): a loop takes :class:`Hooks`; the pipeline makes them from a :class:`Checkpointer`.

Under torchrun the loop's state is replicated on every rank and rank 0 writes it; a stop request
seen by any rank stops all of them at the same step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ssdd import artifacts, distributed
from ssdd.errors import Stopped

log = logging.getLogger("ssdd")


@dataclass
class Hooks:
    """Checkpoint / resume / stop hooks of one resumable loop (see ``distill_krr_st``)."""

    resume: dict | None = None
    checkpoint: Callable[[dict], None] | None = None
    checkpoint_due: Callable[[int], bool] = lambda step: False
    should_stop: Callable[[], bool] = lambda: False
    agree: bool = True  # ranks run this loop in step (replicated / data-parallel); False: a rank's own unit

    def after_step(self, step: int, total: int, state: Callable[[], dict], name: str) -> None:
        """Call after step ``step`` of ``total``: checkpoint when due or when a stop was asked for, then
        stop (:class:`ssdd.errors.Stopped`) if it was and work remains."""
        stop = distributed.any_true(self.should_stop()) if self.agree else self.should_stop()
        if self.checkpoint and (stop or self.checkpoint_due(step)):
            self.checkpoint(state())
        if stop and step < total:
            raise Stopped(name, step)


class Checkpointer:
    """Periodic checkpoints of one loop in its output folder (every N steps and every M minutes)."""

    def __init__(self, out: Path, stage: str, fingerprint: str, every: int, minutes: float, device: str | None = None,
                 inputs: dict | None = None, accept: tuple[str, ...] = (),
                 why: Callable[[dict | None], str] | None = None):
        """``device``: the kind (cpu, cuda) the loop runs on, recorded so that a resume on another kind is
        refused with one line (device generators keep a different state on each). ``inputs``: the unit's
        inputs, recorded in each checkpoint; ``why(recorded inputs)`` says what changed when a checkpoint is
        refused; ``accept``: older fingerprints of the same inputs (checkpoints written before inputs were recorded)."""
        self.out, self.stage, self.fingerprint, self.every, self.minutes = out, stage, fingerprint, every, minutes
        self.device, self.inputs, self.accept, self.why = device, inputs, accept, why
        self.last = time.monotonic()

    def load(self) -> dict | None:
        state = artifacts.load_checkpoint(self.out, self.stage, self.fingerprint, self.device, self.why, self.accept)
        if state is not None:
            log.info("%-8s resuming from the checkpoint at step %d", self.stage, state["step"])
        return state

    def due(self, step: int) -> bool:
        if (self.every and step % self.every == 0) or time.monotonic() - self.last > 60 * self.minutes:
            self.last = time.monotonic()
            return True
        return False

    def save(self, state: dict) -> None:
        artifacts.save_checkpoint(self.out, self.stage, state, self.fingerprint, device=self.device, inputs=self.inputs)

    def clear(self) -> None:
        artifacts.clear_checkpoints(self.out, self.stage)

    def hooks(self, should_stop: Callable[[], bool] = lambda: False) -> Hooks:
        return Hooks(self.load(), self.save, self.due, should_stop)
