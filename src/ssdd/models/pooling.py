"""Global average pooling that stays deterministic on CUDA when asked to.

``AdaptiveAvgPool2d``'s CUDA backward adds with atomics, so two runs (or a resumed and an uninterrupted
one) differ in the last bits. Under ``torch.use_deterministic_algorithms(True)`` (``--deterministic``)
on CUDA this pools with a plain mean instead, whose backward is deterministic; everywhere else it is
``AdaptiveAvgPool2d(1)`` exactly, so CPU results do not change.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda and torch.are_deterministic_algorithms_enabled():
        return x.mean((2, 3), keepdim=True)
    return F.adaptive_avg_pool2d(x, 1)


torch.fx.wrap("global_avg_pool")  # one opaque call for fx (BatchNorm folding traces the backbones)


class GlobalAvgPool(nn.AdaptiveAvgPool2d):
    """``AdaptiveAvgPool2d(1)`` (same type for probes that look for it, no state), deterministic on CUDA."""

    def __init__(self) -> None:
        super().__init__(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return global_avg_pool(x)
