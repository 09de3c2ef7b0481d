"""A pickle reader that cannot run code, for the CIFAR "python version" batches.

Pickle executes whatever callables a file names, so an ordinary ``pickle.load`` of a downloaded
file is arbitrary code execution. CIFAR batches only need dicts/lists of bytes, ints and one
numpy uint8 array; ``find_class`` admits exactly the globals that takes and refuses the rest."""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np

from ssdd.data.formats.common import one_line
from ssdd.errors import UserError

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]


def _latin1_encode(text: Any, encoding: str = "latin1") -> bytes:
    """Python 3 pickles of bytes (protocol < 3) are ``_codecs.encode(str, 'latin1')``; allow only that."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode used for something other than bytes")
    return text.encode("latin-1")


def _empty_bytes(*args: Any) -> bytes:
    """Python 3 pickles ``b''`` as ``bytes()``; ``bytes(n)`` (n zero bytes) is never needed."""
    if args and not isinstance(args[0], (bytes, bytearray, list)):
        raise pickle.UnpicklingError("bytes() called with a non-bytes argument")
    return bytes(*args)


_CONTAINERS = {"bytes": _empty_bytes, "list": list, "dict": dict, "tuple": tuple, "set": set,
               "frozenset": frozenset}
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(mod, name): obj for mod in ("builtins", "__builtin__") for name, obj in _CONTAINERS.items()},
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # written by numpy 1.x (the official files)
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # written by numpy 2.x
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose only reachable globals are ``_ALLOWED``."""

    def __init__(self, file: io.BytesIO, where: str, what: str):
        super().__init__(file, encoding="bytes")
        self.where, self.what = where, what

    def find_class(self, module: str, name: str) -> Any:
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise UserError(f"{self.where}: refused to unpickle {module}.{name} (not a {self.what})")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UserError(f"{self.where}: refused to unpickle a persistent id (not a {self.what})")


def safe_unpickle(raw: bytes, where: str, what: str = "CIFAR batch") -> Any:
    """Unpickle ``raw`` with the restricted unpickler; any failure is a one-line UserError."""
    try:
        return RestrictedUnpickler(io.BytesIO(raw), where, what).load()
    except UserError:
        raise
    except Exception as err:  # truncated or corrupted: EOFError, UnpicklingError, ValueError, ...
        detail = one_line(err) or type(err).__name__
        raise UserError(f"{where}: not a readable {what}, the file is truncated or corrupted ({detail})") from None
