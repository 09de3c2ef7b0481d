"""Differentiable siamese augmentation (DSA, Zhao & Bilen 2021), batched over groups.

Parameters are drawn once per *group* and every image names its group, so the real and the synthetic
images of one class (one group) go through exactly the same transformation: DSA's "siamese" sharing,
which DM uses too. As published (aug_mode "S"), each group applies one operation picked at random from
the strategy; ``single=False`` applies them all in the published order (colour, crop, cutout, flip,
scale, rotate; scale and rotate composed into one resampling). Every operation is differentiable in
the images. Magnitudes are DSA's: brightness +-0.5, saturation x[0, 2], contrast x[0.5, 1.5], crop
shift up to 1/8 of the side (zero fill), cutout of half the side, scale x[1/1.2, 1.2] per axis,
rotation +-15 degrees. They act in whatever space the images live in (DSA: normalised images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ssdd.data.augment import apply_crop_flip
from ssdd.errors import UserError

OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
PUBLISHED = "color_crop_cutout_flip_scale_rotate"


def parse_strategy(strategy: str, option: str) -> tuple[str, ...]:
    """``"color_crop_..."`` -> its operations (``""`` or ``"none"``: none), or one error naming ``option``."""
    if strategy.strip().lower() in ("", "none"):
        return ()
    ops = tuple(strategy.split("_"))
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise UserError(f"config: {option}: unknown augmentation {unknown[0]!r} in {strategy!r} "
                        f"(valid: operations from {', '.join(OPS)} joined by '_', or 'none')")
    return ops


@dataclass
class AugParams:
    """One draw per group; ``active[g, i]`` says whether operation ``OPS[i]`` acts on group ``g``."""

    active: torch.Tensor  # (G, len(OPS)) bool
    brightness: torch.Tensor  # (G,) added
    saturation: torch.Tensor  # (G,) factor on the deviation from the per-pixel channel mean
    contrast: torch.Tensor  # (G,) factor on the deviation from the image mean
    pad: int
    dy: torch.Tensor  # (G,) crop offsets in [0, 2 pad] (pad = no shift)
    dx: torch.Tensor
    cut: int
    cut_y: torch.Tensor  # (G,) cutout centres
    cut_x: torch.Tensor
    flip: torch.Tensor  # (G,) bool
    scale: torch.Tensor  # (G, 2) per-axis factors
    angle: torch.Tensor  # (G,) radians

    def __len__(self) -> int:
        return len(self.active)


def draw(groups: int, ops: tuple[str, ...], size: int, generator: torch.Generator, single: bool = True,
         one_op: bool = False, device: torch.device | str = "cpu") -> AugParams:
    """Parameters for ``groups`` groups of ``size``-px images. Every draw is made whatever ``ops`` holds,
    so a run's random stream does not depend on the strategy. ``one_op``: one operation for all groups
    (DSA's network training: per-image parameters, one operation per batch)."""
    gen = generator
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    pick = torch.randint(0, max(1, len(ops)), (1 if one_op else groups,), generator=gen).expand(groups)
    active = torch.zeros(groups, len(OPS), dtype=torch.bool)
    if ops:
        chosen = torch.tensor([OPS.index(op) for op in ops])
        if single:
            active[torch.arange(groups), chosen[pick]] = True
        else:
            active[:, chosen] = True
    pad, cut = int(size * 0.125 + 0.5), int(size * 0.5 + 0.5)
    ratio = 1.2
    params = AugParams(
        active=active, brightness=u(groups) - 0.5, saturation=u(groups) * 2.0, contrast=u(groups) + 0.5,
        pad=pad, dy=torch.randint(0, 2 * pad + 1, (groups,), generator=gen),
        dx=torch.randint(0, 2 * pad + 1, (groups,), generator=gen),
        cut=cut, cut_y=torch.randint(0, size, (groups,), generator=gen),
        cut_x=torch.randint(0, size, (groups,), generator=gen), flip=u(groups) < 0.5,
        scale=u(groups, 2) * (ratio - 1 / ratio) + 1 / ratio, angle=(u(groups) - 0.5) * 2 * math.radians(15.0))
    return AugParams(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(params).items()})


def apply(x: torch.Tensor, p: AugParams, group: torch.Tensor | None = None) -> torch.Tensor:
    """Transform ``x`` (N, C, H, W); image ``i`` uses the parameters of group ``group[i]`` (default: its
    own index). Each operation runs only on the images it acts on; the others pass through bit for bit."""
    g = torch.arange(len(x), device=x.device) if group is None else group.to(x.device)
    if len(g) and int(g.max()) >= len(p):
        raise ValueError(f"group index {int(g.max())} out of range for {len(p)} parameter groups")
    on = p.active[g]
    for op in ("color", "crop", "cutout", "flip"):
        mask = on[:, OPS.index(op)] if op != "flip" else on[:, OPS.index(op)] & p.flip[g]
        if mask.any():
            idx = mask.nonzero().squeeze(1)
            x = x.index_copy(0, idx, _OPS[op](x[idx], p, g[idx]))
    warp = on[:, OPS.index("scale")] | on[:, OPS.index("rotate")]
    if warp.any():
        idx = warp.nonzero().squeeze(1)
        x = x.index_copy(0, idx, _warp(x[idx], p, g[idx], on[idx, OPS.index("scale")], on[idx, OPS.index("rotate")]))
    return x


def _color(x: torch.Tensor, p: AugParams, g: torch.Tensor) -> torch.Tensor:
    col = lambda t: t[g].to(x.dtype)[:, None, None, None]  # noqa: E731
    x = x + col(p.brightness)
    mean = x.mean(1, keepdim=True)
    x = (x - mean) * col(p.saturation) + mean
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) * col(p.contrast) + mean


def _crop(x: torch.Tensor, p: AugParams, g: torch.Tensor) -> torch.Tensor:
    return apply_crop_flip(x, p.pad, p.dy[g], p.dx[g], None)


def _cutout(x: torch.Tensor, p: AugParams, g: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (p.cut_y[g] - p.cut // 2)[:, None], (p.cut_x[g] - p.cut // 2)[:, None]
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows, in_cols = (rows >= top) & (rows < top + p.cut), (cols >= left) & (cols < left + p.cut)
    return x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0.0)


def _flip(x: torch.Tensor, p: AugParams, g: torch.Tensor) -> torch.Tensor:
    return x.flip(3)


_OPS = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip}


def _warp(x: torch.Tensor, p: AugParams, g: torch.Tensor, scale_on: torch.Tensor,
          rotate_on: torch.Tensor) -> torch.Tensor:
    """Scale and/or rotate about the centre (zero fill, bilinear): one resampling by scale @ rotation."""
    s = torch.where(scale_on[:, None], p.scale[g].to(x.dtype), 1.0)
    a = torch.where(rotate_on, p.angle[g].to(x.dtype), 0.0)
    rot = torch.stack([torch.stack([a.cos(), -a.sin()], 1), torch.stack([a.sin(), a.cos()], 1)], 1)
    mat = torch.diag_embed(s) @ rot  # = scale, then rotate, as two successive resamplings would map
    theta = torch.cat([mat, torch.zeros(len(x), 2, 1, device=x.device, dtype=x.dtype)], 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
