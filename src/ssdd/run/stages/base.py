"""What the core needs of a stage."""

from __future__ import annotations

from pathlib import Path

from ssdd.run.state import RunState


class Stage:
    """A stage of ``ssdd run``: ``run`` makes its units (skipping fresh ones), ``outputs`` lists the files
    that must exist for it to count as done. ``main_only``: under torchrun, rank 0 runs it and the others
    wait; ``atomic``: a failure removes the outputs it had begun (never a half-prepared folder)."""

    name = ""
    main_only = False
    atomic = False

    def outputs(self, run: RunState) -> list[Path]:
        raise NotImplementedError

    def run(self, run: RunState) -> None:
        raise NotImplementedError
