"""Batched augmentation on whole device tensors (no per-image Python work)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssdd.data.device_data import upload


def check_generator(generator: torch.Generator | None, device: torch.device | str) -> None:
    """Refuse a draw on ``device`` from a generator that lives elsewhere: torch raises for that only on
    CUDA, deep inside a run, so every sampling helper checks it here, on CPU too."""
    if generator is not None and generator.device.type != torch.device(device).type:
        raise ValueError(f"a random draw on {torch.device(device)} from a generator on {generator.device}: "
                         "draw on the generator's device and move the result")


def crop_flip_params(n: int, pad: int, flip: bool, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The random draws of :func:`crop_flip` for ``n`` images: crop offsets ``dy``, ``dx`` in
    [0, 2 pad] (None without padding) and the flip mask (None without flips), on ``device``.
    They are drawn where ``generator`` lives (a CPU generator for CUDA images is fine: the held-out
    check's fixed batches use one) and moved to ``device``."""
    where = generator.device if generator is not None else torch.device(device)
    check_generator(generator, where)
    dy = dx = mask = None
    if pad > 0:
        dy = upload(torch.randint(0, 2 * pad + 1, (n,), device=where, generator=generator), device)
        dx = upload(torch.randint(0, 2 * pad + 1, (n,), device=where, generator=generator), device)
    if flip:
        mask = upload(torch.rand(n, device=where, generator=generator) < 0.5, device)
    return dy, dx, mask


def apply_crop_flip(x: torch.Tensor, pad: int, dy: torch.Tensor | None, dx: torch.Tensor | None,
                    mask: torch.Tensor | None) -> torch.Tensor:
    """Crop each image at its offset after zero-padding by ``pad``, then flip where ``mask`` says."""
    n, _, h, w = x.shape
    if pad > 0 and dy is not None and dx is not None:
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chan, rows, cols]
    if mask is not None:
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def crop_flip(x: torch.Tensor, pad: int = 4, flip: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop after zero-padding by ``pad`` and random horizontal flip, per image."""
    return apply_crop_flip(x, pad, *crop_flip_params(len(x), pad, flip, generator, x.device))


def ssl_views(x: torch.Tensor, min_scale: float = 0.2, hue: float = 0.1) -> torch.nn.Module:
    """The Barlow Twins view pipeline (kornia): resized crop, flip, colour jitter, grayscale."""
    import kornia.augmentation as K

    size = x.shape[-2:]
    ops: list[torch.nn.Module] = [K.RandomResizedCrop(size, scale=(min_scale, 1.0)), K.RandomHorizontalFlip()]
    if x.shape[1] == 3:
        ops += [K.ColorJitter(0.4, 0.4, 0.2, hue, p=0.8), K.RandomGrayscale(p=0.2)]
    else:
        ops += [K.ColorJitter(0.4, 0.4, p=0.8)]
    return K.AugmentationSequential(*ops)
