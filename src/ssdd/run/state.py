"""What a stage (and the unit machinery) reads of a run: the shape of :class:`ssdd.run.core.Run`, so that the
stages need not import the core that loops over them."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import torch

from ssdd.config import Config
from ssdd.run.inputs import Inputs
from ssdd.run.plan import Plan


class RunState(Protocol):
    cfg: Config
    out: Path
    device: torch.device
    progress: bool
    precision: str
    plan: Plan
    inputs: Inputs
    stop: Callable[[], bool]
