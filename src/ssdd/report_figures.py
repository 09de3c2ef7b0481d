"""The report's figures: loss curves and grids of distilled images above the real images they started from.

:mod:`ssdd.report` collects them with the tables; ``report.md`` and ``report.html`` both show them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ssdd import artifacts, distilled_set, layout
from ssdd.errors import UserError


def save_png(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    artifacts.write_bytes(path, buf.getvalue())


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def image_grid(path: Path, top: torch.Tensor, bottom: torch.Tensor, count: int = 20,
               labels: tuple[str, str] = ("distilled", "initial")) -> None:
    """Images in [0, 1] (N,C,H,W): ``top`` in the first row and ``bottom`` below it, column by column, so
    each distilled image stands above the real image it started from."""
    plt = pyplot()
    count = min(count, len(top), len(bottom))
    fig, axes = plt.subplots(2, count, figsize=(count * 0.8, 2.0), squeeze=False)
    for row, (imgs, label) in enumerate(((top[:count].permute(0, 2, 3, 1).numpy(), labels[0]),
                                         (bottom[:count].permute(0, 2, 3, 1).numpy(), labels[1]))):
        for i in range(count):
            ax = axes[row, i]
            ax.imshow(imgs[i].squeeze(-1) if imgs.shape[-1] == 1 else imgs[i], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        axes[row, 0].set_ylabel(label, fontsize=7)
    save_png(fig, path)
    plt.close(fig)


def curve_plot(path: Path, curves: dict[str, list[float]], title: str, xlabel: str, smooth: int = 1,
               ylabel: str = "loss") -> None:
    """All curves on one axis (log scale when every value is positive)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    positive = True
    for name, ys in curves.items():
        y = np.asarray(ys, float)
        y = y[np.isfinite(y)]
        if smooth > 1 and len(y) > smooth:
            y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
        positive &= bool(len(y) == 0 or (y > 0).all())
        ax.plot(np.arange(len(y)), y, label=name, lw=1)
    if positive:
        ax.set_yscale("log")
    ax.set_title(title), ax.set_xlabel(xlabel), ax.set_ylabel(ylabel)
    if len(curves) > 1:
        ax.legend(fontsize=7)
    save_png(fig, path)
    plt.close(fig)


def _curves(value: Any) -> dict[str, list[float]]:
    """Curves from a log: a list of numbers, or a dict of them (nested dicts are flattened with '/')."""
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value) and value:
        return {"": [float(v) for v in value]}
    if isinstance(value, dict):
        out = {}
        for key, sub in value.items():
            for name, curve in _curves(sub).items():
                out[f"{key}/{name}" if name else str(key)] = curve
        return out
    return {}


def read_log(path: Path, key: str) -> dict[str, list[float]]:
    if not path.is_file():
        return {}
    try:
        data = artifacts.read_json(path)
    except UserError:
        return {}
    return _curves(data.get(key)) if isinstance(data, dict) else {}


def distill_curves(out: Path) -> dict[str, list[float]]:
    """Distillation loss curves by method (first seed): the "losses" metadata of each
    ``distilled/<method>.safetensors``. Missing or unreadable files are skipped."""
    curves = {}
    for path in layout.first_seed_sets(out):
        try:
            losses = distilled_set.read_meta(path).get("losses")
        except UserError:
            continue
        found = _curves(losses)
        if "" in found:
            curves[path.stem] = found[""]
    return curves


@dataclass
class Figure:
    """A picture of the report: its file in ``figures/`` and the caption both pages show."""

    name: str
    caption: str


GRID_COUNT = 20  # images per grid
SAME_PIXELS = 1e-5  # a set within this of its start (in [0, 1]) is its start: float rounding of the image space


def _source_rows(source: Path, index: list[int]) -> torch.Tensor | None:
    """Rows ``index`` of the prepared source's uint8 images, read lazily (the file may be large); None when
    the file is unreadable or an index is out of range."""
    try:
        with safe_open(str(source), framework="pt") as fh:
            images = fh.get_slice("images")
            n = images.get_shape()[0]
            if not all(isinstance(i, int) and 0 <= i < n for i in index):
                return None
            return torch.cat([images[i:i + 1] for i in index])
    except (OSError, SafetensorError, ValueError, KeyError):
        return None


def _start(out: Path, path: Path, images: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """The images a set started from (its first :data:`GRID_COUNT`, [0, 1]) and where they came from,
    or (None, why not). The paired draw's own set (``random_subset``, the same ``init_index``) first: it
    is the start exactly as stored; else the prepared source's images at the set's ``init_index``."""
    index = distilled_set.read_meta(path).get("init_index")
    if not isinstance(index, list) or not index:
        return None, "it records no starting images (init_index)"
    initial = layout.distilled_path(out, "random_subset", 0)
    if initial.is_file() and distilled_set.read_meta(initial).get("init_index") == index and \
            distilled_set.image_shape(initial) == list(images.shape):
        return distilled_set.load(initial).pixels()[:GRID_COUNT], "random_subset"
    source = layout.source_path(out, "train")
    rows = _source_rows(source, index[:GRID_COUNT]) if source.is_file() else None
    if rows is None or list(rows.shape[1:]) != list(images.shape[1:]):
        return None, "its starting images are not in this folder"
    return rows.float() / 255, "source"


def image_grids(out: Path, figures: Path) -> tuple[list[Figure], dict[str, str]]:
    """One grid per first-seed distilled set: its images above the real images it started from. Also,
    per set without a grid, why: sets whose images are their start (selections such as random_ssl or
    kmeans) and sets whose start the folder does not hold."""
    shown, skipped = [], {}
    initial = layout.distilled_path(out, "random_subset", 0)
    for path in layout.first_seed_sets(out):
        method = path.stem
        if path == initial:
            continue  # the paired draw itself: the start of the others
        try:
            x = distilled_set.load(path).pixels()
            x0, origin = _start(out, path, x)
        except UserError:
            skipped[method] = "its file does not load"
            continue
        if x0 is None:
            skipped[method] = origin
            continue
        count = min(GRID_COUNT, len(x), len(x0))
        change = (x[:count] - x0[:count]).abs()
        if float(change.max()) <= SAME_PIXELS:
            skipped[method] = "its images are the real images it starts from: a selection, not optimised"
            continue
        name = "distilled_vs_initial.png" if method == "krr_st" else f"{method}_vs_initial.png"
        image_grid(figures / name, x, x0, count)
        caption = (f"{method}: distilled (top) and the initial real images (bottom)" if origin == "random_subset"
                   else f"{method}: distilled (top) and the source images it started from (bottom, by init_index)")
        shown.append(Figure(name, f"{caption}; mean change {100 * float(change.mean()):.2g} % of the pixel range"))
    return shown, skipped
