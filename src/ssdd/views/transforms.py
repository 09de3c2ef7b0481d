"""The view families a set may carry, as exact, differentiable maps of an image batch.

Every family starts with the identity (view 0 is the stored image, whose target is the set's base target):

- ``rot``: rotations by 0, 90, 180 and 270 degrees (Boost-SSL-DD's views), K = 4;
- ``flip``: the image and its horizontal mirror, K = 2;
- ``rotflip``: the eight symmetries of the square (the four rotations, then each of them mirrored), K = 8;
- ``crops``: the image and four fixed shifted crops of its zero-padded copy (the corners of a
  ``crop_pad`` grid, the same kind of crop the training augmentation draws at random), K = 5.

Each view is a permutation (rot, flip, rotflip) or a shift with zero fill (crops) of the pixels: linear, so a
gradient reaches the stored image through every view (KRR-ST learns through them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NONE = "none"
FAMILIES = {NONE: 1, "rot": 4, "flip": 2, "rotflip": 8, "crops": 5}  # name -> K, the number of views with the identity
CROP_PAD = 4  # pixels a crop view shifts by (the default crop_pad of the augmentation)


def count(family: str) -> int:
    """K, the views per image of ``family`` (1: no views)."""
    if family not in FAMILIES:
        raise ValueError(f"views must be one of {', '.join(FAMILIES)}, got {family!r}")
    return FAMILIES[family]


def _crop(x: torch.Tensor, dy: int, dx: int, pad: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    return F.pad(x, (pad, pad, pad, pad))[..., dy:dy + h, dx:dx + w]


def apply_view(x: torch.Tensor, family: str, view: int) -> torch.Tensor:
    """View ``view`` (0 = identity) of the images ``x`` (N, C, H, W), in whatever space they are stored."""
    k = count(family)
    if not 0 <= view < k:
        raise ValueError(f"view {view} out of range for family {family!r} (K = {k})")
    if view == 0:
        return x
    if family == "rot":
        return torch.rot90(x, view, dims=(-2, -1))
    if family == "flip":
        return torch.flip(x, dims=(-1,))
    if family == "rotflip":
        turned = torch.rot90(x, view % 4, dims=(-2, -1))
        return torch.flip(turned, dims=(-1,)) if view >= 4 else turned
    corners = [(0, 0), (0, 2 * CROP_PAD), (2 * CROP_PAD, 0), (2 * CROP_PAD, 2 * CROP_PAD)]
    dy, dx = corners[view - 1]
    return _crop(x, dy, dx, CROP_PAD)


def expand(x: torch.Tensor, family: str) -> torch.Tensor:
    """All views of every image, view-major: (K·N, C, H, W), rows ``v·N .. (v+1)·N`` are view ``v``."""
    return torch.cat([apply_view(x, family, v) for v in range(count(family))])


def expand_targets(base: torch.Tensor, view_targets: torch.Tensor | None) -> torch.Tensor:
    """The targets of :func:`expand`'s rows: ``base`` (N, d) then each view's (N, K-1, d) column."""
    if view_targets is None or view_targets.shape[1] == 0:
        return base
    return torch.cat([base, *view_targets.unbind(1)])
