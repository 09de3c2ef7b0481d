"""A distilled set's images as 8-bit pixels: what the PNG exports (image folder, Hugging Face) write."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ssdd.distilled_set import DistilledArtifact
from ssdd.errors import UserError


def check_png_folder_out(where: object, images: torch.Tensor, out: Path, writer: str,
                         earlier: Callable[[Path], bool], earlier_what: str) -> None:
    """What both PNG folder exports refuse in one line: images that are not 1 or 3 channels, an ``--out`` that
    is a file, and an existing folder that is not an earlier export of theirs (``earlier``)."""
    if images.shape[1] not in (1, 3):
        raise UserError(f"{where}: PNG export needs 1 or 3 channels, the images have {images.shape[1]}; "
                        "use --format npz")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; {writer} writes a folder")
    if out.is_dir() and not earlier(out):
        raise UserError(f"--out {out}: folder exists and is not {earlier_what}; choose a new or empty folder")


def to_pixels(artifact: DistilledArtifact) -> tuple[np.ndarray, float]:
    """The set's images as (N,H,W,C) uint8 pixels, and the fraction of values outside [0, 1] that were clipped."""
    x = artifact.to_unit()
    clipped = float(((x < 0) | (x > 1)).float().mean())
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), clipped
