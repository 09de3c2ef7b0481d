"""NumPy ``.npz`` image arrays: ``x`` (+ ``y``) or ``x_train``/``y_train``/``x_test``/``y_test``,
optional ``class_names``. Always loaded with ``allow_pickle=False``, so a file cannot run code."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssdd.data.dataset import ImageSet
from ssdd.data.formats.common import decode_names, finish, one_line
from ssdd.errors import UserError


def open_npz(path: Path) -> np.lib.npyio.NpzFile:
    """Open an .npz archive without pickle support; anything else is a one-line UserError."""
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:  # BadZipFile, ValueError (a pickle file), OSError, EOFError
        raise UserError(f"{path}: not a readable .npz archive ({one_line(err) or type(err).__name__})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UserError(f"{path}: holds a single array, expected an .npz archive of named arrays")
    return archive


def npz_array(archive: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as err:
        if "allow_pickle" in str(err) or "Object arrays" in str(err):
            raise UserError(f"{path}: array '{key}' holds Python objects, which are not loaded "
                            f"(save plain numeric or string arrays)") from None
        raise UserError(f"{path}: array '{key}' is unreadable ({one_line(err)})") from None
    except Exception as err:  # truncated member: BadZipFile, EOFError, zlib.error
        raise UserError(f"{path}: array '{key}' is unreadable, truncated or corrupted "
                        f"({one_line(err) or type(err).__name__})") from None


def to_uint8(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind in "iub" and x.size and int(x.min()) >= 0 and int(x.max()) <= 255:
        return x.astype(np.uint8)
    raise UserError(f"{where}: pixels must be uint8 (0-255), got {x.dtype}")


def to_nchw(x: np.ndarray, where: str) -> np.ndarray:
    """(N,H,W) grayscale, (N,H,W,C) or (N,C,H,W) with C in {1, 3} -> (N,C,H,W). When both axes
    could be channels, the reading that gives square images wins, else channels-last."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        last, first = x.shape[3] in (1, 3), x.shape[1] in (1, 3)
        if last and first and x.shape[2] == x.shape[3] and x.shape[1] != x.shape[2]:
            last = False
        if last:
            return x.transpose(0, 3, 1, 2)
        if first:
            return x
    raise UserError(f"{where}: images must be (N,H,W), (N,H,W,C) or (N,C,H,W) with C 1 or 3, "
                    f"got shape {tuple(x.shape)}")


_KEYS = {"train": ("x_train", "x"), "val": ("x_val", "x_test"), "test": ("x_test", "x_val")}


def read_npz(path: Path, split: str, size: int, max_per_class: int | None) -> ImageSet:
    if not path.is_file():
        raise UserError(f"{path}: not a file (npz expects an .npz archive)")
    with open_npz(path) as archive:
        keys = archive.files
        x_key = next((k for k in _KEYS[split] if k in keys), None)
        if x_key is None:
            raise UserError(f"{path}: no image array for split {split} (expected {' or '.join(_KEYS[split])}; "
                            f"has {', '.join(keys) or 'nothing'})")
        y_key = "y" + x_key[1:]
        where = f"{path}:{x_key}"
        x = to_nchw(to_uint8(npz_array(archive, x_key, path), where), where)
        y = npz_array(archive, y_key, path) if y_key in keys else None
        names = None
        if "class_names" in keys:
            raw = npz_array(archive, "class_names", path)
            if raw.dtype.kind not in "US" or raw.ndim != 1:
                raise UserError(f"{path}: 'class_names' must be a 1-D array of strings, got {raw.dtype} {raw.shape}")
            names = decode_names(raw.tolist(), f"{path}:class_names")
    return finish(x, y, names, f"{path.stem}-{split}", size, max_per_class, where)
