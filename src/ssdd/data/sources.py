"""Resolve a source name or path into an ImageSet."""

from __future__ import annotations

from pathlib import Path

from ssdd.data.bundled import BUNDLED, load_bundled
from ssdd.data.dataset import ImageSet, load_dataset
from ssdd.errors import UserError


def load_source(source: str, size: int) -> ImageSet:
    """A bundled dataset by name, or a prepared dataset file (checked to have ``size`` pixels)."""
    if source in BUNDLED:
        return load_bundled(source, size)
    path = Path(source)
    if not path.exists():
        raise UserError(f"{source}: no such file, and not a bundled dataset ({', '.join(BUNDLED)})")
    data = load_dataset(path)
    if data.shape[1:] != (size, size):
        raise UserError(f"{source}: images are {data.shape[1]}x{data.shape[2]}, expected {size}x{size} "
                        f"(prepare it with --size {size})")
    return data
