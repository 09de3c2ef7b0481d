"""Live curves for TensorBoard (``log = "tensorboard"``, ``--log tensorboard``): one optional writer per process.

Why one owner: a training loop says only *what* a number is ("loss", "lr"), the run says *whose* it is
(a :func:`scope` such as ``distill/krr_st/seed0``) and whether anything is written at all. With logging
off (the default) every call here is a no-op, and nothing here changes a result: the ``log`` keys are
in no fingerprint. Only rank 0 writes (under torchrun, units done on other ranks are not shown).

Live: a value goes to the writer where a loop reads its losses (:class:`ssdd.loss_log.StepLog`: every
step on the CPU, every few on a GPU, so logging adds no device sync of its own except the pictures); the
writer's thread appends it to the event file at once (tensorboard's own file layer), or within
:data:`FLUSH_SECS` where the file layer buffers (TensorFlow's, when it is installed). TensorBoard shows a
running stage as it goes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ssdd import distributed
from ssdd.errors import UserError

KINDS = ("none", "tensorboard")
FLUSH_SECS = 2  # the writer flushes at least this often (torch's default, 120 s, is not live)
GRIDS = 20  # log_images_every = 0: about this many pictures of a synthetic set per distillation
GRID_IMAGES = 100  # a picture shows at most the first this many images of the set
INSTALL = ("--log tensorboard needs the tensorboard package: pip install 'ssdd[tb]' "
           "(or pip install 'tensorboard>=2.10')")

_writer: Any = None  # torch.utils.tensorboard.SummaryWriter while a command logs, else None
_images_every = 0
_scope: list[str] = []


def _summary_writer() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module refuses to import without the tensorboard package
        raise UserError(INSTALL) from None
    return SummaryWriter


def require(kind: str) -> None:
    """Refuse ``log = "tensorboard"`` without its package, in one line, before any work."""
    if kind == "tensorboard":
        _summary_writer()


@contextlib.contextmanager
def opened(kind: str, folder: str | Path, images_every: int = 0) -> Iterator[None]:
    """Log to ``folder`` (``<out>/tb``) while the block runs, when ``kind`` is "tensorboard" and this is rank 0;
    closed (everything flushed) at its end. Inside an open writer (``ssdd compare`` runs ``Run.run``) it
    keeps the one already open."""
    global _writer, _images_every
    if kind != "tensorboard" or _writer is not None or not distributed.is_main():
        yield
        return
    _writer = _summary_writer()(str(folder), flush_secs=FLUSH_SECS)
    _images_every = images_every
    try:
        yield
    finally:
        writer, _writer = _writer, None
        writer.close()


def active() -> bool:
    """Whether values are being written (a loop may skip work that only logging needs)."""
    return _writer is not None


@contextlib.contextmanager
def scope(name: str) -> Iterator[None]:
    """Prefix every tag written inside the block with ``name`` (scopes nest: ``finetune/krr_st`` + ``labels1``)."""
    _scope.append(name)
    try:
        yield
    finally:
        _scope.pop()


def tag(name: str) -> str:
    """``name`` under the current scope: ``distill/krr_st/seed0/loss``."""
    return "/".join([*_scope, name])


def scalar(name: str, value: float, step: int) -> None:
    if _writer is not None:
        _writer.add_scalar(tag(name), value, step)


def images_due(step: int, total: int) -> bool:
    """A picture after step ``step`` of ``total`` (counted from 1): after the first, every
    ``log_images_every`` (0: about :data:`GRIDS` per run) and after the last."""
    if _writer is None:
        return False
    every = _images_every or max(1, math.ceil(total / GRIDS))
    return step == 1 or step == total or step % every == 0


def synthetic(step: int, total: int, pixels: Callable[[], torch.Tensor], name: str = "synthetic") -> None:
    """A grid of the synthetic set after step ``step`` of ``total`` when :func:`images_due`; ``pixels()``
    gives the images in [0, 1] (N×C×H×W) and is called only then (it may copy from the device)."""
    if images_due(step, total):
        with torch.no_grad():
            _writer.add_image(tag(name), grid(pixels()[:GRID_IMAGES]), step)


def grid(images: torch.Tensor, pad: int = 1) -> torch.Tensor:
    """N×C×H×W images in [0, 1] -> one 3×H'×W' picture, as square as it gets, a white line between images
    (images of other than 3 channels in gray: their channel mean)."""
    x = images.detach().float().cpu().clamp(0, 1)
    n, c, h, w = x.shape
    if c != 3:
        x, c = x.mean(1, keepdim=True).expand(n, 3, h, w), 3
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    x = torch.cat([x, x.new_ones(rows * cols - n, c, h, w)])
    x = F.pad(x, (pad, pad, pad, pad), value=1.0)
    hp, wp = h + 2 * pad, w + 2 * pad
    return x.reshape(rows, cols, c, hp, wp).permute(2, 0, 3, 1, 4).reshape(c, rows * hp, cols * wp)


def flush() -> None:
    if _writer is not None:
        _writer.flush()
