"""Doing a run's units: freshness agreed by every rank, checkpointed resumable loops, units spread over
ranks in rounds, stops at unit boundaries, wall times."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import ssdd.run.freshness as freshness
from ssdd import artifacts, distributed, layout
from ssdd.checkpoint import Checkpointer, Hooks
from ssdd.errors import Stopped
from ssdd.fingerprint import explain
from ssdd.run.freshness import Unit
from ssdd.run.state import RunState


def fresh(path: Path, unit: Unit) -> bool:
    """An artifact exists and was made for this unit's inputs (then it is reused, not redone; a stale one
    is logged with what changed): rank 0's answer on every rank, so that all ranks do the same units."""
    return distributed.broadcast(freshness.fresh(path, unit) if distributed.is_main() else None)


def checkpointer(run: RunState, name: str, unit: Unit) -> Checkpointer:
    return Checkpointer(run.out, name, unit.fp, run.cfg.checkpoint_every, run.cfg.checkpoint_minutes,
                        run.device.type, inputs=unit.inputs, accept=(unit.legacy,) if unit.legacy else (),
                        why=lambda stored: explain(stored, unit.inputs))


def resumable(run: RunState, name: str, unit: Unit, loop: Callable[[Hooks], Any]) -> tuple[Checkpointer, Any]:
    """Run a step loop with checkpoint hooks (resume, periodic saves, and the run's own stop request: one
    per run, so a signal during a unit's last step still stops the run before its next unit); the caller
    clears the checkpoints once it has saved the result."""
    ckpt = checkpointer(run, name, unit)
    try:
        result = loop(Hooks(ckpt.load(), ckpt.save, ckpt.due, run.stop))
    except Stopped as err:
        raise Stopped(name, err.step, str(run.out)) from None
    return ckpt, result


def check_stop(run: RunState, stage: str, done: int) -> None:
    if distributed.any_true(run.stop()):  # every rank reaches this at the same point
        raise Stopped(stage, done, str(run.out))


def in_rounds(run: RunState, stage: str, units: list, work: Callable[[Any], Any], keep: Callable[[Any, Any], None]) -> None:
    """Independent units (encoders, evaluations) spread over the ranks, one round of N at a time:
    rank r does unit ``i N + r`` of round i, rank 0 receives the round's results and keeps
    (writes) them, so every finished unit survives a stop. One process: one unit per round."""
    n = distributed.world()
    for start in range(0, len(units), n):
        check_stop(run, stage, start)
        mine = start + distributed.rank()
        result = work(units[mine]) if mine < len(units) else None
        for i, made in distributed.gather((mine, result)) or []:
            if i < len(units):
                keep(units[i], made)


def record_time(out: Path, key: str, seconds: float) -> None:
    """Wall times live in ``timings.json``, not in artifacts, so that artifacts stay byte-reproducible."""
    path = layout.timings_path(out)
    times = artifacts.read_json(path) if path.is_file() else {}
    times[key] = round(seconds, 1)
    artifacts.write_json(path, times)
