"""Load a teacher: any module mapping images to vectors. Here: ssdd encoder artifacts."""

from __future__ import annotations

import os

import torch
from torch import nn

from ssdd.errors import UserError
from ssdd.models import Encoder, encoder_from_artifact


class FeatureExtractor(nn.Module):
    """Wrap an encoder so that calling it returns ``features(x)`` (the teacher's representation)."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.features(x)


def load_teacher(path: str | os.PathLike, channels: int, size: int, device: torch.device | str = "cpu") -> tuple[nn.Module, int, dict]:
    """A frozen feature extractor, its output dimension (checked on a probe batch) and metadata."""
    encoder, meta = encoder_from_artifact(path, device)
    teacher = FeatureExtractor(encoder).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            out = teacher(torch.zeros(2, channels, size, size, device=device))
    except RuntimeError as err:
        raise UserError(f"{path}: teacher does not accept {channels}x{size}x{size} images ({str(err).splitlines()[0]})") from None
    if out.ndim != 2:
        raise UserError(f"{path}: teacher must map images to vectors, got output shape {tuple(out.shape)}")
    return teacher, out.shape[1], meta
