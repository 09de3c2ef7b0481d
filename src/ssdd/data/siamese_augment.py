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

from ssdd.data.augment import apply_crop_flip, check_generator
from ssdd.data.device_data import upload
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
    """One draw per group; ``active[g, i]`` says whether operation ``OPS[i]`` acts on group ``g``.

    The tensors live on the data's device; ``host_active`` and ``host_flip`` are CPU copies of the two that
    decide *which* images an operation touches, so :func:`apply` builds its masks and indices on the host
    and never waits for the device (no ``.item()``, ``any()`` or ``nonzero()`` on device tensors)."""

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
    host_active: torch.Tensor | None = None  # CPU copy of ``active`` (None: made from it when needed)
    host_flip: torch.Tensor | None = None  # CPU copy of ``flip``

    def __len__(self) -> int:
        return len(self.active)


# the tensor fields of AugParams in one packed float64 block (exact for every value held: float32 draws,
# small integers and booleans), so moving a draw to the device is one copy, not twelve
_FLOATS = ("brightness", "saturation", "contrast", "angle")
_INTS = ("dy", "dx", "cut_y", "cut_x")


def _pack(fields: dict[str, torch.Tensor]) -> torch.Tensor:
    cols = [fields["active"].to(torch.float64), fields["scale"].to(torch.float64)]
    cols += [fields[name].to(torch.float64)[:, None] for name in (*_FLOATS, *_INTS, "flip")]
    return torch.cat(cols, 1)


def _unpack(packed: torch.Tensor, float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    k = len(OPS)
    cols = packed[:, k + 2:].unbind(1)
    out = {"active": packed[:, :k].to(torch.bool), "scale": packed[:, k:k + 2].to(float_dtype)}
    out.update({name: col.to(float_dtype) for name, col in zip(_FLOATS, cols)})
    out.update({name: col.to(torch.long) for name, col in zip(_INTS, cols[len(_FLOATS):])})
    out["flip"] = cols[-1].to(torch.bool)
    return out


def draw(groups: int, ops: tuple[str, ...], size: int, generator: torch.Generator, single: bool = True,
         one_op: bool = False, device: torch.device | str = "cpu") -> AugParams:
    """Parameters for ``groups`` groups of ``size``-px images. Every draw is made whatever ``ops`` holds,
    so a run's random stream does not depend on the strategy. ``one_op``: one operation for all groups
    (DSA's network training: per-image parameters, one operation per batch).

    The draws are made where ``generator`` lives (a CPU generator for device images is the intended use)
    and reach ``device`` in one packed copy; a generator on the device itself costs one copy back of the
    operation masks (``host_active``, ``host_flip``)."""
    gen, where = generator, generator.device
    check_generator(gen, where)
    u = lambda *shape: torch.rand(*shape, generator=gen, device=where)  # noqa: E731
    pick = torch.randint(0, max(1, len(ops)), (1 if one_op else groups,), generator=gen, device=where).expand(groups)
    active = torch.zeros(groups, len(OPS), dtype=torch.bool, device=where)
    if ops:
        chosen = torch.tensor([OPS.index(op) for op in ops], device=where)
        if single:
            active[torch.arange(groups, device=where), chosen[pick]] = True
        else:
            active[:, chosen] = True
    pad, cut = int(size * 0.125 + 0.5), int(size * 0.5 + 0.5)
    ratio = 1.2
    fields = dict(  # drawn in this order: the random stream of a run
        active=active, brightness=u(groups) - 0.5, saturation=u(groups) * 2.0, contrast=u(groups) + 0.5,
        dy=torch.randint(0, 2 * pad + 1, (groups,), generator=gen, device=where),
        dx=torch.randint(0, 2 * pad + 1, (groups,), generator=gen, device=where),
        cut_y=torch.randint(0, size, (groups,), generator=gen, device=where),
        cut_x=torch.randint(0, size, (groups,), generator=gen, device=where), flip=u(groups) < 0.5,
        scale=u(groups, 2) * (ratio - 1 / ratio) + 1 / ratio, angle=(u(groups) - 0.5) * 2 * math.radians(15.0))
    if where.type == "cpu":
        host_active, host_flip = fields["active"], fields["flip"]
    else:  # masks back to the host once per draw (the rest of the parameters stay on the device)
        host = torch.cat([fields["active"], fields["flip"][:, None]], 1).cpu()
        host_active, host_flip = host[:, :-1], host[:, -1]
    device = torch.device(device)
    if device.type != where.type or (device.index not in (None, where.index) and where.index is not None):
        fields = _unpack(upload(_pack(fields), device), fields["brightness"].dtype)
    return AugParams(**fields, pad=pad, cut=cut, host_active=host_active, host_flip=host_flip)


def apply(x: torch.Tensor, p: AugParams, group: torch.Tensor | None = None) -> torch.Tensor:
    """Transform ``x`` (N, C, H, W); image ``i`` uses the parameters of group ``group[i]`` (default: its
    own index). Each operation runs only on the images it acts on; the others pass through bit for bit.

    Which images each operation touches is decided on the host from ``group`` and the draw's host masks,
    and every index reaches the device in one copy: pass ``group`` as a CPU tensor (a device ``group``
    works but costs one device-to-host copy, a sync)."""
    host_g = torch.arange(len(x)) if group is None else group.cpu()
    if len(host_g) and int(host_g.max()) >= len(p):
        raise ValueError(f"group index {int(host_g.max())} out of range for {len(p)} parameter groups")
    host_active = p.active.cpu() if p.host_active is None else p.host_active
    host_flip = p.flip.cpu() if p.host_flip is None else p.host_flip
    on = host_active[host_g]
    masks = [on[:, OPS.index(op)] for op in ("color", "crop", "cutout")]
    masks.append(on[:, OPS.index("flip")] & host_flip[host_g])
    scale_on, rotate_on = on[:, OPS.index("scale")], on[:, OPS.index("rotate")]
    masks.append(scale_on | rotate_on)
    rows = [mask.nonzero().squeeze(1) for mask in masks]
    if not any(len(r) for r in rows):
        return x
    warp = rows[-1]
    pieces = [t for r in rows for t in (r, host_g[r])] + [scale_on[warp].long(), rotate_on[warp].long()]
    sizes = [len(t) for t in pieces]
    pieces = upload(torch.cat(pieces), x.device).split(sizes)  # one copy of every index
    for i, op in enumerate(("color", "crop", "cutout", "flip")):
        idx, g = pieces[2 * i], pieces[2 * i + 1]
        if len(idx):
            x = x.index_copy(0, idx, _OPS[op](x[idx], p, g))
    idx, g, s_on, r_on = pieces[8:]
    if len(idx):
        x = x.index_copy(0, idx, _warp(x[idx], p, g, s_on.bool(), r_on.bool()))
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
