"""Dataset readers: raw files in common formats -> ``ImageSet`` (uint8 N x C x H x W at a fixed
size, int64 labels when known, class names). One module per format; this one checks the
arguments and dispatches. Nothing here unpickles with the stock unpickler or runs file content."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


from ssdd.artifacts import load_tensors
from ssdd.data.bundled import load_bundled
from ssdd.data.dataset import ImageSet, load_dataset
from ssdd.data.formats.cifar import read_cifar
from ssdd.data.formats.common import SPLITS, finish
from ssdd.data.formats.hf import read_hf
from ssdd.data.formats.imagefolder import read_imagefolder
from ssdd.data.formats.imagenet64 import read_imagenet64
from ssdd.data.formats.npz import read_npz
from ssdd.errors import UserError

FORMATS: tuple[str, ...] = ("cifar10", "cifar100", "imagefolder", "imagenet64", "npz", "bundled", "hf")

__all__ = ["FORMATS", "read_source", "dataset_info"]


def read_source(path: str, fmt: str, size: int, split: str = "train", max_per_class: int | None = None,
                seed: int = 0, image_column: str | None = None, label_column: str | None = None,
                progress: bool = False) -> ImageSet:
    """Read ``path`` in format ``fmt`` as an ImageSet of size x size images.

    ``split`` is train, val or test (val and test both mean the held-out split a format has).
    ``max_per_class`` keeps the first K images of each class in file (or sorted file-name) order,
    so the result does not depend on ``seed``; ``seed`` is accepted so callers can pass it uniformly.
    ``image_column``/``label_column`` name the columns of an ``hf`` dataset; ``progress`` shows its bar.
    """
    del seed  # every reader is deterministic
    if fmt not in FORMATS:
        raise UserError(f"format: unknown '{fmt}' (expected one of: {', '.join(FORMATS)})")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"size: must be a positive integer, got {size!r}")
    if split not in SPLITS:
        raise UserError(f"split: unknown '{split}' (expected one of: {', '.join(SPLITS)})")
    if max_per_class is not None and (isinstance(max_per_class, bool) or not isinstance(max_per_class, int)
                                      or max_per_class < 1):
        raise UserError(f"max_per_class: must be a positive integer, got {max_per_class!r}")
    if fmt != "hf" and (image_column or label_column):
        raise UserError(f"image/label columns apply to format hf only, not {fmt}")
    if fmt == "hf":  # before the existence check: PATH may be a glob
        return read_hf(path, split, size, max_per_class, image_column, label_column, progress)
    if fmt == "bundled":  # no split of its own: the fixed stratified 70/30 split that targets use
        from ssdd.data.dataset import stratified_split

        data = load_bundled(path, size)
        train, test = stratified_split(data.labels, 0.3, seed=0)
        data = data.subset(train if split == "train" else test)
        labels = data.labels.numpy() if data.labels is not None else None
        return finish(data.images, labels, data.class_names, data.name, size, max_per_class, path)
    source = Path(os.path.expanduser(path))
    if not source.exists():
        raise UserError(f"{path}: no such file or folder (for format {fmt})")
    if fmt in ("cifar10", "cifar100"):
        return read_cifar(source, fmt, split, size, max_per_class)
    if fmt == "imagefolder":
        return read_imagefolder(source, split, size, max_per_class)
    if fmt == "imagenet64":
        return read_imagenet64(source, split, size, max_per_class)
    return read_npz(source, split, size, max_per_class)


def _floats(value: Any, channels: int) -> list[float] | None:
    if isinstance(value, list) and len(value) == channels and all(isinstance(v, (int, float)) for v in value):
        return [float(v) for v in value]
    return None


def dataset_info(path: str) -> dict:
    """Summary of a prepared .safetensors dataset file: count, shape [C,H,W], num_classes,
    class_names, has_labels and per-channel mean/std (from its metadata, else computed)."""
    data = load_dataset(path)
    meta = load_tensors(path)[1]
    channels = data.shape[0]
    mean, std = _floats(meta.get("mean"), channels), _floats(meta.get("std"), channels)
    if mean is None or std is None:
        mean, std = data.mean_std()
    return {"count": len(data), "shape": list(data.shape), "num_classes": data.num_classes,
            "class_names": list(data.class_names), "has_labels": data.labels is not None,
            "mean": mean, "std": std}
