"""Safe artifact formats and atomic writes.

Everything ssdd writes is safetensors (tensors + string metadata) or JSON, written to a
temporary file in the same folder, fsynced and renamed, so a crash never leaves a
half-written artifact and loading never executes code.
"""

from __future__ import annotations

import contextvars
import hashlib
import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

import ssdd
from ssdd import distributed
from ssdd.errors import UserError


_OWN_WRITES: contextvars.ContextVar[bool] = contextvars.ContextVar("ssdd_own_writes", default=False)


@contextmanager
def own_writes() -> Iterator[None]:
    """Let this rank write in the block: the checkpoints of a unit of work only it runs (a fine-tune of
    the evaluate stage under torchrun), in files no other rank writes."""
    token = _OWN_WRITES.set(True)
    try:
        yield
    finally:
        _OWN_WRITES.reset(token)


def _writer() -> bool:
    return distributed.is_main() or _OWN_WRITES.get()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and rename it onto ``path``.

    Under torchrun only rank 0 writes: the other ranks get a scratch path that is thrown away, so
    every writer stays one code path and a run folder never has two writers."""
    if not _writer():
        with tempfile.TemporaryDirectory(prefix="ssdd-rank-scratch-") as scratch:
            yield Path(scratch) / Path(path).name
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{path.parent}: output folder is a file") from None
    except OSError as err:
        raise UserError(f"{path.parent}: cannot create the output folder ({err.strerror or err})") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise UserError(f"{path}: cannot write into {path.parent} ({err.strerror or err})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        raise UserError(f"{path}: write failed ({err.strerror or err})") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` to fill; on success rename it onto ``path``, so a crash never
    leaves a half-written folder. A folder already at ``path`` is moved aside first and put back if the
    rename fails; whether it may be replaced at all is the caller's decision. Under torchrun only rank 0
    writes (the other ranks fill a scratch folder that is thrown away), as in :func:`atomic_path`."""
    if not _writer():
        with tempfile.TemporaryDirectory(prefix="ssdd-rank-scratch-") as scratch:
            (Path(scratch) / Path(path).name).mkdir()
            yield Path(scratch) / Path(path).name
        return
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as err:
        raise UserError(f"{out}: cannot write into {out.parent} ({err.strerror or err})") from None
    old = None
    try:
        yield tmp
        if out.exists():  # moved aside, put back if the rename fails
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / out.name).exists() and not out.exists():
            os.replace(old / out.name, out)
        if isinstance(err, OSError):
            raise UserError(f"{out}: write failed ({err.strerror or err})") from None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def _reads_as_json(text: str) -> bool:
    """Whether :func:`read_meta` would decode this string as something else (``"123"`` as a number): such a
    string is stored JSON-encoded, so it reads back as the same string."""
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Save tensors with metadata; non-string metadata values are stored as JSON strings."""
    meta = {"ssdd_version": ssdd.__version__, **meta}
    str_meta = {k: v if isinstance(v, str) and not _reads_as_json(v) else json.dumps(v) for k, v in meta.items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_bytes(path, _canonical_header(st_save_bytes(tensors, metadata=str_meta)))


def _canonical_header(data: bytes) -> bytes:
    """Rewrite the safetensors JSON header with sorted keys: the library orders metadata by hash,
    so without this the same content gives different bytes from run to run. Offsets in the header
    are relative to the data block, so only the header changes (padded with spaces, as the format allows)."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + n:]


def load_tensors(path: str | os.PathLike, required: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file: tensors and metadata (JSON strings decoded where possible)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        tensors = st_load_bytes(data)
        header_len = int.from_bytes(data[:8], "little")
        raw_meta = json.loads(data[8:8 + header_len]).get("__metadata__", {}) or {}
    except (SafetensorError, ValueError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a valid safetensors file ({err})") from None
    meta: dict[str, Any] = {}
    for key, value in raw_meta.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    missing = [k for k in required if k not in tensors]
    if missing:
        raise UserError(f"{path}: missing tensors {missing} (has {sorted(tensors)})")
    return tensors, meta


def _header(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n < 100_000_000:
                raise ValueError("bad header length")
            return json.loads(fh.read(n))
    except (OSError, ValueError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a valid safetensors file ({err})") from None


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """A safetensors file's metadata without reading its tensors (JSON strings decoded)."""
    meta = {}
    for key, value in (_header(path).get("__metadata__") or {}).items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return meta


def tensor_shapes(path: str | os.PathLike) -> dict[str, list[int]]:
    """Each tensor's shape, from the header only."""
    return {k: v["shape"] for k, v in _header(path).items() if k != "__metadata__"}


# ---- encoders -------------------------------------------------------------------------

def save_encoder(path: str | os.PathLike, model: torch.nn.Module, spec: dict[str, Any], meta: dict[str, Any]) -> None:
    """Save a model's weights with the spec that rebuilds it (``ssdd.models.build(spec)``)."""
    state = {k: v for k, v in model.state_dict().items()}
    save_tensors(path, state, {"kind": "encoder", "model_spec": spec, **meta})


def load_encoder(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state, meta = load_tensors(path)
    if meta.get("kind") != "encoder" or "model_spec" not in meta:
        raise UserError(f"{path}: not an ssdd encoder artifact (no model_spec in its metadata)")
    return state, meta


# ---- checkpoints ----------------------------------------------------------------------
# A checkpoint is `<name>.ckpt-<step>.pt` (torch.save of tensors, numbers, lists and dicts only,
# read back with weights_only=True) plus `<name>.ckpt-<step>.json` written after it, holding its
# SHA-256, the step and the config fingerprint. The last two are kept.

def _checkpoint_records(folder: Path, name: str) -> list[tuple[int, Path]]:
    records = []
    for meta_path in folder.glob(f"{name}.ckpt-*.json"):
        try:
            records.append((int(meta_path.stem.rsplit("-", 1)[1]), meta_path))
        except ValueError:
            continue
    return sorted(records, reverse=True)


def save_checkpoint(folder: str | os.PathLike, name: str, state: dict[str, Any], fingerprint: str, keep: int = 2,
                    device: str | None = None, inputs: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint so that a kill at any instant leaves at most ``keep`` of them and at least
    the previous intact one: prune first, then the record (its SHA-256), then the data it describes.
    ``device`` (cpu, cuda) is recorded: device generators keep a different state on each kind."""
    folder = Path(folder)
    step = int(state["step"])
    path = folder / f"{name}.ckpt-{step:09d}.pt"
    if not _writer():  # replicated state: rank 0's checkpoint is every rank's
        return path
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    complete = [p for _, p in _checkpoint_records(folder, name) if p.with_suffix(".pt").is_file()]
    kept = {p.stem for p in complete[:keep - 1]}
    for old in list(folder.glob(f"{name}.ckpt-*.pt")) + list(folder.glob(f"{name}.ckpt-*.json")):
        if old.stem not in kept:  # older ones, and a file whose partner a kill never let us write
            old.unlink(missing_ok=True)
    write_json(path.with_suffix(".json"), {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "step": step,
                                           "fingerprint": fingerprint, "ssdd_version": ssdd.__version__,
                                           **({"device": device} if device else {}),
                                           **({"inputs": inputs} if inputs is not None else {})})
    write_bytes(path, data)
    return path


def load_checkpoint(folder: str | os.PathLike, name: str, fingerprint: str, device: str | None = None,
                    why: Callable[[dict[str, Any] | None], str] | None = None,
                    accept: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The newest intact checkpoint of this config, or None; a checkpoint of another config (the error says
    what changed: ``why(its recorded inputs)``), or one written on another kind of device (``device``: cpu,
    cuda), is an error. ``accept``: other fingerprints of the same inputs (written before inputs were recorded)."""
    for step, meta_path in _checkpoint_records(Path(folder), name):
        try:
            meta = json.loads(meta_path.read_text())
            data = meta_path.with_suffix(".pt").read_bytes()
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("fingerprint") != fingerprint and meta.get("fingerprint") not in accept:
            changed = f" ({why(meta.get('inputs'))})" if why is not None else ""
            raise UserError(f"{meta_path}: a {name} checkpoint of a different config is in this --out folder{changed}; "
                            "use another --out, or delete its *.ckpt-* files to start over")
        if device and meta.get("device", device) != device:
            raise UserError(f"{meta_path}: this {name} checkpoint was written on {meta['device']} and cannot resume "
                            f"on {device} (their random generators differ); run with --device {meta['device']}, "
                            "or delete its *.ckpt-* files to start over")
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            continue  # damaged: fall back to the previous one
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return None


def rng_state() -> dict[str, Any]:
    """The global torch RNG streams a training loop draws from: the CPU's, and the current CUDA device's
    (kornia's augmentations draw there once moved to the GPU). Only this process's own device: a resume
    with fewer visible GPUs, or on another torchrun rank, restores it into that rank's own device."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"torch_rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state() if cuda else None}


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_rng"])
    saved = state.get("cuda_rng")
    if saved is None or not torch.cuda.is_available():
        return
    if isinstance(saved, (list, tuple)):  # checkpoints before 2026-12: every visible device's state
        current = torch.cuda.current_device()
        saved = saved[current] if current < len(saved) else saved[0]
    torch.cuda.set_rng_state(saved)


def has_checkpoint(folder: str | os.PathLike, name: str) -> bool:
    return bool(_checkpoint_records(Path(folder), name))


def clear_checkpoints(folder: str | os.PathLike, name: str) -> None:
    if not _writer():
        return
    for _, meta_path in _checkpoint_records(Path(folder), name):
        meta_path.with_suffix(".pt").unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
