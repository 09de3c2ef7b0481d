"""An imported set made an ssdd distilled set: ssdd's checks and conventions (image space and
statistics, targets and objective) applied to what a reader found, written through
:mod:`ssdd.distilled_set` with the metadata ssdd's own sets carry."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from ssdd import distilled_set
from ssdd.distilled_set import DistilledArtifact, channel_values
from ssdd.errors import UserError
from ssdd.interop.readers import FORMATS_IN, READERS, Foreign

log = logging.getLogger("ssdd")

IMAGE_SPACES = ("auto", "raw", "reference", "normalized")
OBJECTIVES = ("auto", "mse", "cross_entropy")


# ---- ssdd's conventions ---------------------------------------------------------------------

def _images(found: Foreign) -> torch.Tensor:
    x = found.images
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or min(x.shape) == 0:
        raise UserError(f"{found.where}: images must be (N,C,H,W) (or (N,H,W)), got shape {tuple(found.images.shape)}")
    if x.dtype == torch.bool or x.dtype.is_complex:
        raise UserError(f"{found.where}: images must be real numbers, got {x.dtype}")
    x = x.float()
    if not torch.isfinite(x).all():
        raise UserError(f"{found.where}: images hold NaN or inf values")
    return x.contiguous()


def _channel_stats(values: Sequence[float] | None, channels: int, name: str) -> list[float] | None:
    try:
        return channel_values(values, channels)
    except ValueError as err:
        raise UserError(f"--{name}: {err}") from None


def resolve_space(found: Foreign, images: torch.Tensor, image_space: str, mean: Sequence[float] | None,
                  std: Sequence[float] | None) -> tuple[torch.Tensor, str, list[float], list[float], str]:
    """The artifact's image space and statistics. Precedence: ``--image-space``, then what the file
    records, then what its format's code implies (KRR-ST: reference, MKDT: normalised), then the
    values (all within [0, 1]: reference; else normalised). Pixel data (PNGs, uint8 arrays) is read
    as pixel/255; asked for ``normalized`` it is stored normalised with the given mean/std.
    Returns (images, space, mean, std, how the space was decided)."""
    if image_space not in IMAGE_SPACES:
        raise UserError(f"--image-space must be one of {', '.join(IMAGE_SPACES)}, got {image_space!r}")
    c = images.shape[1]
    mean_, std_ = _channel_stats(mean, c, "mean"), _channel_stats(std, c, "std")
    if (mean_ is None) != (std_ is None):
        raise UserError("--mean and --std go together: give both or neither")
    if mean_ is None and found.mean is not None and found.std is not None:
        mean_, std_ = _channel_stats(found.mean, c, "mean"), _channel_stats(found.std, c, "std")
    if std_ is not None and min(std_) <= 0:
        raise UserError(f"--std: every value must be positive, got {std_}")
    in_unit = bool(images.min() >= 0 and images.max() <= 1)
    if image_space != "auto":
        space, how = ("reference" if image_space == "raw" else image_space), "given"
    elif found.space is not None:
        space, how = found.space, found.space_source
    elif found.pixels or in_unit:
        space, how = "reference", "detected: values within [0, 1]"
    else:
        space, how = "normalized", "detected: values outside [0, 1]"
    if space == "normalized" and mean_ is None:
        hint = f" ({found.hint})" if found.hint else ""
        raise UserError(f"{found.where}: images are in normalised space ({how}); give the --mean and --std they were "
                        f"normalised with, or --image-space raw if they are pixel/255{hint}")
    if found.pixels and space == "normalized":
        images = (images - torch.tensor(mean_).view(1, -1, 1, 1)) / torch.tensor(std_).view(1, -1, 1, 1)
    if mean_ is None:  # reference space: informational only, so the images' own statistics
        flat = images.clamp(0, 1).transpose(0, 1).reshape(c, -1).double()
        mean_ = flat.mean(1).tolist()
        std_ = torch.std(flat, 1, correction=0).clamp_min(1e-3).tolist()
        how += "; mean/std: the images' own"
    return images, space, mean_, std_, how


def resolve_targets(targets: torch.Tensor | None, n: int, where: str, objective: str = "auto",
                    recorded: str | None = None, num_classes: int | None = None) -> tuple[torch.Tensor, str]:
    """ssdd's targets and objective: integer labels or one-hot rows -> one-hot class probabilities
    with ``cross_entropy``; real-valued vectors -> ``mse``; no targets -> ``barlow_twins`` (m, 0)."""
    if objective not in OBJECTIVES:
        raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if targets is None or (targets.ndim == 2 and targets.shape[1] == 0):
        if targets is not None and len(targets) != n:
            raise UserError(f"{where}: {n} images but {len(targets)} targets")
        if objective != "auto":
            raise UserError(f"{where}: --objective {objective} needs targets, and this set has none")
        return torch.zeros(n, 0), "barlow_twins"
    if targets.dtype == torch.bool:
        targets = targets.long()
    if targets.dtype.is_complex or targets.ndim not in (1, 2):
        raise UserError(f"{where}: targets must be labels (N,) or vectors (N,d), got {targets.dtype} "
                        f"{tuple(targets.shape)}")
    if len(targets) != n:
        raise UserError(f"{where}: {n} images but {len(targets)} targets")
    if not torch.isfinite(targets.double()).all():
        raise UserError(f"{where}: targets hold NaN or inf values")
    if targets.ndim == 1:
        labels = targets.double()
        if (labels != labels.round()).any() or (labels < 0).any():
            raise UserError(f"{where}: 1-D targets must be class labels (non-negative integers)")
        labels = labels.long()
        classes = max(int(labels.max()) + 1, num_classes or 0)
        rows = torch.nn.functional.one_hot(labels, classes).float()
        return rows, ("cross_entropy" if objective == "auto" else objective)
    rows = targets.float()
    one_hot = bool(((rows == 0) | (rows == 1)).all() and (rows.sum(1) == 1).all())
    if not targets.dtype.is_floating_point and not one_hot:
        raise UserError(f"{where}: integer 2-D targets must be one-hot rows, got values outside 0/1")
    if objective == "auto":
        objective = recorded if recorded in ("mse", "cross_entropy") else ("cross_entropy" if one_hot else "mse")
    if objective == "cross_entropy" and not one_hot:
        if (rows < 0).any() or not torch.allclose(rows.sum(1), torch.ones(n), atol=1e-3):
            raise UserError(f"{where}: cross_entropy targets must be class probabilities (non-negative rows "
                            "summing to 1); use --objective mse for real-valued target vectors")
    return rows, objective


def read_foreign(fmt: str, paths: list[Path]) -> Foreign:
    """What the reader of ``fmt`` finds in ``paths``."""
    if fmt == "hf":
        from ssdd.interop.hf import read_hf_set  # needs the optional datasets package

        return read_hf_set(paths)
    return READERS[fmt](paths)


def import_set(files: Sequence[str | os.PathLike], fmt: str, out: str | os.PathLike, image_space: str = "auto",
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None, objective: str = "auto",
               method: str | None = None) -> Path:
    """Convert another tool's distilled set into an ssdd distilled-set artifact at ``out`` (written
    atomically), with the metadata ssdd's own sets carry, so ``pretrain --distilled`` treats it alike."""
    if fmt not in FORMATS_IN:
        raise UserError(f"import: unknown --format {fmt!r} (expected {', '.join(FORMATS_IN)})")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give the file to write (e.g. {out}/NAME.safetensors)")
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.exists():
            raise UserError(f"{path}: not found")
    found = read_foreign(fmt, paths)
    images = _images(found)
    images, space, mean_, std_, how = resolve_space(found, images, image_space, mean, std)
    classes = len(found.meta["class_names"]) if isinstance(found.meta.get("class_names"), list) else None
    targets, objective_ = resolve_targets(found.targets, len(images), found.where, objective, found.objective, classes)
    extra = dict(found.meta)
    spec = extra.pop("model_spec", None)
    distilled_set.save(out, DistilledArtifact(
        images, targets, method=method or out.stem, objective=objective_, lr=found.lr, image_space=space, mean=mean_,
        std=std_, model_spec=spec, meta={"imported_from": {"format": fmt, "files": found.files, "image_space": how},
                                         **extra}, views=found.views, view_targets=found.view_targets))
    log.info("imported %d images %s, targets %s (%s), %s space (%s)%s -> %s", len(images), list(images.shape[1:]),
             list(targets.shape[1:]), objective_, space, how, f", lr {found.lr:g}" if found.lr is not None else "", out)
    return out
