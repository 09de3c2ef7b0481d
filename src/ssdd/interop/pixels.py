"""A distilled set's images as 8-bit pixels: what the PNG exports (image folder, Hugging Face) write."""

from __future__ import annotations

import numpy as np
import torch

from ssdd.distilled_set import DistilledArtifact


def to_pixels(artifact: DistilledArtifact) -> tuple[np.ndarray, float]:
    """The set's images as (N,H,W,C) uint8 pixels, and the fraction of values outside [0, 1] that were clipped."""
    x = artifact.to_unit()
    clipped = float(((x < 0) | (x > 1)).float().mean())
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), clipped
