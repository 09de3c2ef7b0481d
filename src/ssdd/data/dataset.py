"""The canonical dataset file: uint8 images N x C x H x W, optional int64 labels, class names,
per-channel mean/std. Stored as safetensors, so loading never executes code."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ssdd.artifacts import load_tensors, save_tensors
from ssdd.errors import UserError


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor | None = None  # int64 (N,)
    class_names: list[str] = field(default_factory=list)
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise UserError(f"dataset {self.name}: images must be uint8 (N,C,H,W), got "
                            f"{self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) == 0:
            raise UserError(f"dataset {self.name}: no images")
        if self.labels is not None and self.labels.shape != (len(self.images),):
            raise UserError(f"dataset {self.name}: {len(self.labels)} labels for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        if self.class_names:
            return len(self.class_names)
        return int(self.labels.max()) + 1 if self.labels is not None else 0

    def mean_std(self, chunk: int = 1024) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the pixels scaled to [0, 1] (running sums: no float copy of the set)."""
        channels = self.images.shape[1]
        total, square, count = torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64), 0
        for i in range(0, len(self.images), chunk):
            x = self.images[i:i + chunk].transpose(0, 1).reshape(channels, -1).double() / 255
            total += x.sum(1)
            square += (x * x).sum(1)
            count += x.shape[1]
        mean = total / count
        var = (square / count - mean ** 2).clamp_min(0) * count / max(count - 1, 1)
        return mean.tolist(), var.sqrt().clamp_min(1e-3).tolist()

    def subset(self, index: torch.Tensor | np.ndarray, name: str | None = None) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        labels = self.labels[index] if self.labels is not None else None
        return ImageSet(self.images[index], labels, list(self.class_names), name or self.name)


def save_dataset(path: str | os.PathLike, data: ImageSet, meta: dict | None = None) -> None:
    mean, std = data.mean_std()
    tensors = {"images": data.images}
    if data.labels is not None:
        tensors["labels"] = data.labels.long()
    save_tensors(path, tensors, {"kind": "dataset", "name": data.name, "class_names": data.class_names,
                                 "mean": mean, "std": std, **(meta or {})})


def load_dataset(path: str | os.PathLike) -> ImageSet:
    tensors, meta = load_tensors(path, required=("images",))
    if meta.get("kind") != "dataset":
        raise UserError(f"{path}: not an ssdd dataset file (kind={meta.get('kind')!r})")
    images, labels = tensors["images"], tensors.get("labels")
    names = meta.get("class_names", [])
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise UserError(f"{path}: images must be uint8 (N,C,H,W), got {images.dtype} {tuple(images.shape)}")
    if len(images) == 0:
        raise UserError(f"{path}: the dataset holds no images")
    if not isinstance(names, list):
        raise UserError(f"{path}: class_names metadata must be a list")
    if labels is not None:
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or labels.shape != (len(images),):
            raise UserError(f"{path}: labels must be integers, one per image; got {labels.dtype} "
                            f"{tuple(labels.shape)} for {len(images)} images")
        limit = len(names) or None
        if labels.min() < 0 or (limit is not None and labels.max() >= limit):
            raise UserError(f"{path}: labels must lie in [0, {limit or 'num_classes'}), got "
                            f"{int(labels.min())}..{int(labels.max())} with {len(names)} class names")
        labels = labels.long()
    return ImageSet(images, labels, [str(n) for n in names], str(meta.get("name", "")))


def stratified_split(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic per-class split into (train_index, test_index)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    y = labels.numpy()
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.from_numpy(np.sort(np.concatenate(train))), torch.from_numpy(np.sort(np.concatenate(test)))


def stratified_fraction(labels: torch.Tensor, fraction: float, rng: np.random.Generator) -> torch.Tensor:
    """A random subset holding ``fraction`` of each class (at least one image per class)."""
    y = labels.numpy()
    picks = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = max(1, int(round(len(idx) * fraction)))
        picks.append(rng.choice(idx, size=min(k, len(idx)), replace=False))
    return torch.from_numpy(np.sort(np.concatenate(picks)))
