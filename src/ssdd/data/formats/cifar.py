"""CIFAR-10 / CIFAR-100 "python version": the batch folder or its .tar.gz, read without extracting
and without running code (see ``safe_pickle``). Each batch is a dict with ``data`` (N x 3072
uint8: 1024 R, 1024 G, 1024 B values, 32x32 row-major) and a label list."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssdd.data.dataset import ImageSet
from ssdd.data.formats.common import decode_names, finish, one_line
from ssdd.data.formats.safe_pickle import safe_unpickle
from ssdd.errors import UserError


@dataclass(frozen=True)
class _Layout:
    title: str
    folder: str  # the folder name inside the official archive
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str


LAYOUTS = {
    "cifar10": _Layout("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                       ("test_batch",), "batches.meta", "labels", "label_names"),
    "cifar100": _Layout("CIFAR-100", "cifar-100-python", ("train",), ("test",), "meta", "fine_labels",
                        "fine_label_names"),
}


def _text_key(key: object) -> object:
    return key.decode("latin-1") if isinstance(key, bytes) else key


def _read_tar(path: Path, wanted: set[str]) -> dict[str, tuple[str, bytes]]:
    """One streaming pass over the archive, keeping the members whose base name is wanted."""
    found: dict[str, tuple[str, bytes]] = {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and base not in found:
                    fh = tar.extractfile(member)
                    found[base] = (f"{path}:{member.name}", fh.read() if fh else b"")
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:  # zlib.error is an Exception too
        raise UserError(f"{path}: not a readable tar archive, truncated or corrupted ({one_line(err)})") from None
    except Exception as err:
        raise UserError(f"{path}: not a readable tar archive ({type(err).__name__}: {one_line(err)})") from None
    return found


def _read_folder(root: Path, names: list[str]) -> dict[str, tuple[str, bytes]]:
    found = {}
    for name in names:
        file = root / name
        if file.is_file():
            try:
                found[name] = (str(file), file.read_bytes())
            except OSError as err:
                raise UserError(f"{file}: cannot read ({err.strerror or err})") from None
    return found


def _is_tar(path: Path) -> bool:
    if path.name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        return True
    try:
        return tarfile.is_tarfile(path)
    except (OSError, tarfile.TarError):
        return False


def _batch(obj: object, where: str, layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """(N,3,32,32) uint8 images and int64 labels from one unpickled batch dict."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: not a {layout.title} batch (holds a {type(obj).__name__}, expected a dict)")
    batch = {_text_key(k): v for k, v in obj.items()}
    data, labels = batch.get("data"), batch.get(layout.label_key)
    if labels is None:
        other = "cifar100" if layout.label_key == "labels" and "fine_labels" in batch else None
        hint = f"; it looks like {other}, use that format" if other else ""
        raise UserError(f"{where}: no '{layout.label_key}' in this batch{hint}")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{where}: 'data' must be a uint8 N x 3072 array, got {got}")
    try:
        y = np.asarray(labels)
    except Exception:
        y = np.empty(0, dtype=object)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise UserError(f"{where}: '{layout.label_key}' must be a list of integers")
    if len(y) != len(data):
        raise UserError(f"{where}: {len(y)} labels for {len(data)} images")
    return data.reshape(-1, 3, 32, 32), y.astype(np.int64)


def read_cifar(path: Path, fmt: str, split: str, size: int, max_per_class: int | None) -> ImageSet:
    """Read the train or test split (``val`` means test) of a CIFAR folder, archive or single batch file."""
    layout = LAYOUTS[fmt]
    batches = list(layout.train if split == "train" else layout.test)
    if path.is_dir():
        root = path
        if not any((root / n).is_file() for n in layout.train + layout.test) and (root / layout.folder).is_dir():
            root = root / layout.folder
        files = _read_folder(root, batches + [layout.meta])
    elif _is_tar(path):
        root = path
        files = _read_tar(path, set(batches + [layout.meta]))
    else:  # one batch file; its meta file may sit beside it
        root, batches = path.parent, [path.name]
        files = _read_folder(root, batches + [layout.meta])
    present = [b for b in batches if b in files]
    if not present:
        expected = ", ".join(batches)
        raise UserError(f"{root}: no {layout.title} {split} batches found (expected {expected} of the python version)")
    images, labels = [], []
    for name in present:
        where, raw = files[name]
        x, y = _batch(safe_unpickle(raw, where, "CIFAR batch"), where, layout)
        images.append(x)
        labels.append(y)
    class_names = None
    if layout.meta in files:
        where, raw = files[layout.meta]
        meta = safe_unpickle(raw, where, "CIFAR meta file")
        if not isinstance(meta, dict):
            raise UserError(f"{where}: not a {layout.title} meta file (expected a dict)")
        meta = {_text_key(k): v for k, v in meta.items()}
        if layout.names_key in meta:
            class_names = decode_names(meta[layout.names_key], where)
    name = f"{fmt}-{'train' if split == 'train' else 'test'}"
    return finish(np.concatenate(images), np.concatenate(labels), class_names, name, size, max_per_class, str(path))
