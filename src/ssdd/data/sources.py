"""Resolve a source or target *spec* from a config into ImageSets.

A spec is one of:
- a bundled dataset name: ``digits``, ``mnist5k``;
- a prepared dataset file (``.safetensors``, from ``ssdd prepare``);
- ``FORMAT:PATH`` with a format of :data:`ssdd.data.formats.FORMATS`, e.g.
  ``imagefolder:../shared/data/tiny-imagenet-200-subset`` or ``npz:data/cifar.npz``;
- ``hf:PATH`` (a Hugging Face ``save_to_disk`` folder, or a folder or glob of parquet files), with the
  columns named in brackets when they are not ``image``/``img`` and ``label``/``labels``:
  ``hf[image=img,label=fine_label]:data/cifar100`` (``label=none``: read it unlabelled);
- a plain path: a folder is read as ``imagefolder`` (a ``save_to_disk`` folder as ``hf``), a ``.npz`` as
  ``npz``, a ``.parquet`` file as ``hf``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssdd.data.bundled import BUNDLED, load_bundled
from ssdd.data.dataset import ImageSet, load_dataset, stratified_split
from ssdd.data.formats import FORMATS, read_source
from ssdd.data.formats.common import first_per_class
from ssdd.data.formats.hf import has_heldout, is_saved_dataset, parse_options, short_name
from ssdd.errors import UserError


def _head(spec: str) -> tuple[str, str, str | None]:
    """(format, path, bracket options or None) of ``FORMAT:PATH`` / ``FORMAT[options]:PATH``; format ""
    when the spec does not start with a known format."""
    head, sep, tail = spec.partition(":")
    if sep and head in FORMATS:
        return head, tail, None
    name, bracket, rest = head.partition("[")
    if sep and bracket and name in FORMATS:
        if not rest.endswith("]"):
            raise UserError(f"{spec}: options go in closed brackets, e.g. hf[image=img,label=fine_label]:PATH")
        return name, tail, rest[:-1]
    return "", spec, None


def parse_spec(spec: str) -> tuple[str, str]:
    """(format, path) of a spec; format ``prepared`` for our own dataset files."""
    if spec in BUNDLED:
        return "bundled", spec
    fmt, tail, _ = _head(spec)
    if fmt:
        return fmt, tail
    path = Path(spec)
    if path.suffix == ".safetensors":
        return "prepared", spec
    if path.suffix == ".npz":
        return "npz", spec
    if path.suffix == ".parquet" or is_saved_dataset(path):
        return "hf", spec
    if path.is_dir():
        return "imagefolder", spec
    if not path.exists():
        raise UserError(f"{spec}: no such file or folder, and not a bundled dataset ({', '.join(BUNDLED)})")
    raise UserError(f"{spec}: cannot tell its format; write FORMAT:PATH with FORMAT one of {', '.join(FORMATS)}")


def _check_size(data: ImageSet, spec: str, size: int) -> ImageSet:
    if data.shape[1:] != (size, size):
        raise UserError(f"{spec}: images are {data.shape[1]}x{data.shape[2]}, expected {size}x{size} "
                        f"(prepare it with --size {size})")
    return data


def spec_options(spec: str) -> dict[str, str]:
    """The reader options a spec's bracket gives (``hf[image=img]:PATH`` -> ``{"image_column": "img"}``)."""
    fmt, _, options = _head(spec)
    if options is None:
        return {}
    if fmt != "hf":
        raise UserError(f"{spec}: options in brackets apply to format hf only")
    return parse_options(options, spec)


def load_source(spec: str, size: int, split: str = "train", max_per_class: int | None = None,
                progress: bool = False) -> ImageSet:
    """One split of a spec, as images of ``size`` x ``size`` pixels."""
    fmt, path = parse_spec(spec)
    if fmt == "prepared":
        if not Path(path).exists():
            raise UserError(f"{path}: file not found")
        return _check_size(load_dataset(path), spec, size)
    if fmt == "bundled":
        return load_bundled(path, size)
    return read_source(path, fmt, size, split, max_per_class, progress=progress, **spec_options(spec))


def has_own_test_split(spec: str) -> bool:
    """Whether the spec carries its own test (or val) split; otherwise one is held out."""
    fmt, path = parse_spec(spec)
    if fmt in ("prepared", "bundled"):
        return False
    if fmt == "npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                return any(k in archive.files for k in ("x_test", "x_val"))
        except (OSError, ValueError):
            return False  # the reader reports the problem with the file
    if fmt == "imagefolder":
        root = Path(path)
        return any((root / d).is_dir() for d in ("val", "test"))
    if fmt == "hf":
        return has_heldout(path)
    return True


def load_target(spec: str, size: int, test_fraction: float, max_per_class: int | None = None,
                progress: bool = False) -> tuple[ImageSet, ImageSet]:
    """(train, test) of a labelled target: its own test/val split when the format has one,
    otherwise a fixed stratified split (seed 0) holding out ``test_fraction``."""
    hint = " (no label or labels column; name one with hf[label=COL]:PATH)" if parse_spec(spec)[0] == "hf" else ""
    if has_own_test_split(spec):
        train = load_source(spec, size, "train", max_per_class, progress)
        test = load_source(spec, size, "test", progress=progress)
    else:
        full = load_source(spec, size, progress=progress)
        if full.labels is None:
            raise UserError(f"target {spec}: has no labels{hint}")
        train_idx, test_idx = stratified_split(full.labels, test_fraction, seed=0)
        train, test = full.subset(train_idx), full.subset(test_idx)
        if max_per_class:
            train = train.subset(first_per_class(train.labels.numpy(), max_per_class))
    for part, data in (("train", train), ("test", test)):
        if data.labels is None:
            raise UserError(f"target {spec}: its {part} split has no labels{hint}")
    return train, test


def target_name(spec: str) -> str:
    """A short name for tables and file names."""
    fmt, path = parse_spec(spec)
    if fmt == "hf":
        return short_name(path)
    return path if fmt == "bundled" else Path(path.rstrip("/")).stem
