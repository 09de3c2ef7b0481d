"""Device-resident data: uint8 images live on the device; a batch is an index gather."""

from __future__ import annotations

import torch

from ssdd.data.dataset import ImageSet


def upload(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t.to(device)``; a CPU tensor bound for a GPU goes through pinned memory with ``non_blocking``, so
    the host neither waits for the copy nor for the work queued before it. (Any other move is a plain,
    blocking ``.to``: a non-blocking copy *to* the host could be read before it lands.)"""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Normalizer:
    """uint8 -> float in the dataset's normalised space (and back, for pictures)."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device | str = "cpu"):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __call__(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return self.normalize_unit(x_uint8.float() / 255)

    def normalize_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] -> normalised space."""
        return (x - self.mean) / self.std

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.std + self.mean).clamp(0, 1)


class BatchSampler:
    """Random batches (without replacement within an epoch) from device-resident images.

    The order is drawn on the CPU (the same batches on every device) and copied to the device once
    per epoch, so a batch is a slice there: no host-to-device copy, and no wait, per step."""

    def __init__(self, data: ImageSet, batch: int, device: torch.device | str, seed: int):
        self.images = data.images.to(device)
        self.labels = data.labels.to(device) if data.labels is not None else None
        self.batch = min(batch, len(data))
        self.generator = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.long)
        self._on_device = self._order
        self._pos = 0

    def next_index(self) -> torch.Tensor:
        if self._pos + self.batch > len(self._order):
            self._set_order(torch.randperm(len(self.images), generator=self.generator))
            self._pos = 0
        idx = self._on_device[self._pos:self._pos + self.batch]
        self._pos += self.batch
        return idx

    def _set_order(self, order: torch.Tensor) -> None:
        self._order = order
        self._on_device = upload(order, self.images.device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self._order.clone(), "pos": self._pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._set_order(state["order"].clone())
        self._pos = int(state["pos"])

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = self.next_index()
        return self.images[idx], (self.labels[idx] if self.labels is not None else None)
