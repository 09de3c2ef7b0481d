"""Downsampled ImageNet (Chrabaszcz et al. 2017) npz batches: ``train_data_batch_1..10`` and
``val_data``, each with ``data`` (N x 3*S*S uint8, channel-major) and 1-based ``labels``.
Batches are capped and resized one at a time, so memory stays near the output size."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from ssdd.data.dataset import ImageSet
from ssdd.data.formats.common import finish, first_per_class, resize_nchw
from ssdd.data.formats.npz import npz_array, open_npz
from ssdd.errors import UserError

_TRAIN = re.compile(r"^train_data_batch_(\d+)(\.npz)?$")
_VAL = re.compile(r"^val_data(\.npz)?$")


def _batch_files(path: Path, split: str) -> list[Path]:
    """Matching files in ``path`` and its direct sub-folders (the official train set comes as two
    part folders), train batches in numeric order."""
    if path.is_file():
        return [path]
    folders = [path] + sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = []
    for folder in folders:
        for file in folder.iterdir():
            match = (_TRAIN if split == "train" else _VAL).match(file.name)
            if match and file.is_file():
                found.append((int(match.group(1)) if split == "train" else 0, file.name, file))
    if not found:
        expected = "train_data_batch_<k>[.npz]" if split == "train" else "val_data[.npz]"
        raise UserError(f"{path}: no downsampled-ImageNet {split} files (expected {expected})")
    return [f for _, _, f in sorted(found)]


def _load(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N,3,S,S) uint8 images and 0-based int64 labels of one batch file."""
    with open_npz(file) as archive:
        missing = [k for k in ("data", "labels") if k not in archive.files]
        if missing:
            raise UserError(f"{file}: missing arrays {missing} (has {', '.join(archive.files)})")
        data, labels = npz_array(archive, "data", file), npz_array(archive, "labels", file)
    side = math.isqrt(data.shape[1] // 3) if data.ndim == 2 else 0
    if data.dtype != np.uint8 or data.ndim != 2 or side == 0 or 3 * side * side != data.shape[1]:
        raise UserError(f"{file}: 'data' must be uint8 N x (3*S*S), got {data.dtype} {data.shape}")
    labels = np.asarray(labels).reshape(-1)
    if labels.dtype.kind not in "iu" or len(labels) != len(data):
        raise UserError(f"{file}: 'labels' must be {len(data)} integers, got {labels.dtype} {labels.shape}")
    if len(labels) and labels.min() < 1:
        raise UserError(f"{file}: labels must be 1-based (found {int(labels.min())})")
    return data.reshape(-1, 3, side, side), labels.astype(np.int64) - 1


def read_imagenet64(path: Path, split: str, size: int, max_per_class: int | None) -> ImageSet:
    images, labels, seen = [], [], {}  # type: ignore[var-annotated]
    for file in _batch_files(path, split):
        x, y = _load(file)
        if max_per_class is not None:
            keep = first_per_class(y, max_per_class, seen)
            x, y = x[keep], y[keep]
        images.append(resize_nchw(torch.from_numpy(np.ascontiguousarray(x)), size))
        labels.append(y)
    name = f"imagenet64-{'train' if split == 'train' else 'val'}"
    return finish(torch.cat(images), np.concatenate(labels), None, name, size, None, str(path))
