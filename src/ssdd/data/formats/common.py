"""Steps every reader shares: argument checks, the per-class cap, resizing uint8 arrays and the
final checks that turn arrays into an ``ImageSet``. Kept here so each format module stays about
its file layout only."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ssdd.data.dataset import ImageSet
from ssdd.errors import UserError

SPLITS = ("train", "val", "test")


def one_line(text: object) -> str:
    """Collapse a message (often a library's exception text) onto one line."""
    return " ".join(str(text).split())


def first_per_class(labels: np.ndarray, k: int, seen: dict[int, int] | None = None) -> np.ndarray:
    """Indices, in file order, of the first ``k`` items of each label. ``seen`` carries the counts
    already taken across several batches (so a multi-file dataset is capped as a whole)."""
    seen = {} if seen is None else seen
    order = np.argsort(labels, kind="stable")
    values, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    keep = []
    for value, start, count in zip(values.tolist(), starts.tolist(), counts.tolist()):
        room = k - seen.get(value, 0)
        if room > 0:
            take = min(room, count)
            keep.append(order[start:start + take])
            seen[value] = seen.get(value, 0) + take
    return np.sort(np.concatenate(keep)) if keep else np.empty(0, dtype=np.int64)


def resize_nchw(images: torch.Tensor, size: int, chunk: int = 512) -> torch.Tensor:
    """Resize uint8 (N,C,H,W) to size x size: antialiased bilinear on floats, rounded back to
    uint8. Works in chunks so a large set never needs a full float copy."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, images.shape[0], chunk):
        x = images[i:i + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[i:i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def decode_names(values: object, where: str) -> list[str]:
    """Class names stored as a list/array of str or bytes -> list[str]."""
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise UserError(f"{where}: class names must be a list of strings, got {type(values).__name__}")
    names = []
    for value in list(values):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                value = value.decode("latin-1")
        elif isinstance(value, np.str_):
            value = str(value)
        if not isinstance(value, str):
            raise UserError(f"{where}: class names must be strings, got {type(value).__name__}")
        names.append(value)
    return names


def finish(images: np.ndarray | torch.Tensor, labels: np.ndarray | None, class_names: list[str] | None,
           name: str, size: int, max_per_class: int | None, where: str) -> ImageSet:
    """Check labels and names, apply the per-class cap, resize, and build the ImageSet."""
    images = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise UserError(f"{where}: images must be uint8 (N,C,H,W), got {images.dtype} {tuple(images.shape)}")
    if len(images) == 0:
        raise UserError(f"{where}: no images")
    y = None
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise UserError(f"{where}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        if len(labels) != len(images):
            raise UserError(f"{where}: {len(labels)} labels for {len(images)} images")
        labels = labels.astype(np.int64)
        if labels.min() < 0:
            raise UserError(f"{where}: negative label {int(labels.min())}")
        top = int(labels.max())
        if class_names and top >= len(class_names):
            raise UserError(f"{where}: label {top} but only {len(class_names)} class names")
        if not class_names:
            class_names = [str(i) for i in range(top + 1)]
        if max_per_class is not None:
            index = first_per_class(labels, max_per_class)
            images, labels = images[torch.from_numpy(index)], labels[index]
        y = torch.from_numpy(labels)
    elif max_per_class is not None:  # unlabelled: the cap applies to the whole set
        images = images[:max_per_class]
    images = resize_nchw(images, size)
    return ImageSet(images.contiguous(), y, [str(c) for c in (class_names or [])], name)
