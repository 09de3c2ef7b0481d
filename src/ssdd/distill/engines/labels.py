"""Label targets of the labelled kernel methods (FRePo, KIP)."""

from __future__ import annotations

from typing import Callable

import torch

from ssdd.distill.registry import SourceLabels


def centred_one_hot(labels: SourceLabels, device: torch.device | str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``index -> one_hot(labels[index]) - 1/C`` on ``device``: the regression targets of FRePo and KIP
    (centring makes an all-zero prediction the uninformed one). Made on ``device`` from the labels kept
    there, so a device ``index`` (a real batch, every step) never goes back to the host."""
    def targets(index: torch.Tensor) -> torch.Tensor:
        return labels.one_hot(index, device) - 1.0 / labels.num_classes
    return targets
