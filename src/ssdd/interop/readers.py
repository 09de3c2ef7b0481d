"""Other tools' distilled sets, read as they are, with the safety policy every read follows.

- ``krr_st``: the KRR-ST reference code's ``x_syn.pt`` (N,C,H,W floats) and ``y_syn.pt`` (N,d target
  vectors, or integer labels for its baselines). Its images stay in raw [0, 1] pixel space
  (``reference`` space): the code initialises ``x_syn`` from the un-normalised loader batch and
  normalises only the real images.
- ``mkdt``: MKDT's ``images_<it>.pt`` / ``labels_<it>.pt`` (target representations) and optional
  ``synlr_<it>.pt`` (the learned learning rate). Its images are normalised with the dataset's
  mean/std (``transforms.Normalize`` in its ``get_dataset``), so they need ``--mean``/``--std``.
- ``npz``: ``images`` (or ``x``), ``targets``/``labels`` (or ``y``), optional ``lr``; read with
  ``allow_pickle=False``.
- ``hf``: a Hugging Face dataset (:mod:`ssdd.interop.hf`; needs the optional ``datasets``).
- ``imagefolder``: image files in class sub-folders (labels become one-hot targets), or a flat folder
  with a ``targets.npz`` (what ``export_set`` writes), or a flat folder alone (images only: the set is
  pre-trained self-supervised, like ssdd's ``barlow_twins`` sets).

Every ``.pt`` file is read with ``torch.load(weights_only=True)``: a pickle that would run code is
refused. A reader returns what it found (:class:`Foreign`); :mod:`ssdd.interop.convert` applies
ssdd's checks and conventions.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ssdd.data.formats.common import one_line
from ssdd.data.formats.npz import npz_array, open_npz, to_nchw
from ssdd.errors import UserError

FORMATS_IN = ("krr_st", "mkdt", "npz", "imagefolder", "hf")
TARGETS_FILE = "targets.npz"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Statistics MKDT normalises with (its utils.get_dataset), quoted in the error that asks for them.
MKDT_STATS_HINT = ("MKDT's CIFAR-10: --mean 0.4914 0.4822 0.4465 --std 0.2023 0.1994 0.2010; "
                   "CIFAR-100: --mean 0.5071 0.4865 0.4409 --std 0.2009 0.1984 0.2023")


@dataclass
class Foreign:
    """What a reader found, before ssdd's checks and conventions are applied."""

    images: torch.Tensor
    targets: torch.Tensor | None
    files: list[str]
    where: str
    lr: float | None = None
    pixels: bool = False  # images are pixel/255 read from PNGs or uint8 arrays: in [0, 1] by construction
    space: str | None = None  # the space the file records or its format implies; None = detect from values
    space_source: str = ""  # why ``space`` (for the log and the artifact's metadata)
    hint: str = ""  # appended to the error that asks for --mean/--std
    mean: list[float] | None = None
    std: list[float] | None = None
    objective: str | None = None  # recorded by an ssdd export
    meta: dict[str, Any] = field(default_factory=dict)  # carried into the artifact (class_names, model_spec)
    views: str = "none"  # an ssdd export of a set with views: its view family and view targets (m, K-1, d)
    view_targets: torch.Tensor | None = None


# ---- reading foreign files ------------------------------------------------------------------

def load_pt(path: Path) -> Any:
    """A ``.pt`` file through the weights-only unpickler only: tensors and plain containers load, a
    pickle that names any other callable (one that could run code) is refused before it runs."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:  # torch words this in several ways; name the global when it does
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
        blocked = re.search(r"GLOBAL ([\w.]+)", text)
        if blocked:
            raise UserError(f"{path}: refused: loading it would call {blocked.group(1)} (a pickle that runs code or "
                            "builds objects); only weights-only torch files of tensors are read") from None
        found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\n|$)", text, re.S)
        why = one_line(found.group(1) if found else text)[:160]
        raise UserError(f"{path}: not a weights-only torch file of tensors ({why})") from None
    except Exception as err:  # RuntimeError for a corrupt zip, EOFError for a truncated file, ...
        raise UserError(f"{path}: not a readable torch file ({one_line(err)[:160] or type(err).__name__})") from None


def _pt_tensor(path: Path, what: str) -> torch.Tensor:
    obj = load_pt(path)
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        obj = torch.tensor(float(obj))
    if not isinstance(obj, torch.Tensor):
        raise UserError(f"{path}: expected a tensor of {what}, got {type(obj).__name__}")
    return obj.detach()


def _scalar(value: torch.Tensor | np.ndarray, where: str) -> float:
    arr = np.asarray(value.double().numpy() if isinstance(value, torch.Tensor) else value, dtype=np.float64)
    if arr.size != 1 or not np.isfinite(arr).all():
        raise UserError(f"{where}: the learning rate must be one finite number, got shape {tuple(arr.shape)}")
    return float(arr.reshape(()))


def _single(paths: list[Path], fmt: str, kind: str) -> Path:
    if len(paths) != 1:
        raise UserError(f"import --format {fmt}: expected one {kind}, got {len(paths)} paths")
    if not paths[0].exists():
        raise UserError(f"{paths[0]}: not found")
    return paths[0]


def _by_role(paths: list[Path], fmt: str, roles: dict[str, Callable[[str], bool]], expected: str) -> dict[str, Path]:
    """Assign each given file to a role by its name (e.g. ``x_syn*.pt`` -> images)."""
    found: dict[str, Path] = {}
    for path in paths:
        role = next((r for r, match in roles.items() if match(path.name)), None)
        if role is None:
            raise UserError(f"{path}: not a file of --format {fmt} by its name (expected {expected})")
        if role in found:
            raise UserError(f"{path}: a second {role} file (first: {found[role]})")
        found[role] = path
    return found


def read_krr_st(paths: list[Path]) -> Foreign:
    """``x_syn.pt`` + ``y_syn.pt`` (or the folder holding them), as the reference code's Logger saves them."""
    if len(paths) == 1 and paths[0].is_dir():
        paths = [paths[0] / "x_syn.pt", paths[0] / "y_syn.pt"]
    roles = _by_role(paths, "krr_st", {"images": lambda n: n.startswith("x_syn"),
                                       "targets": lambda n: n.startswith("y_syn")}, "x_syn*.pt and y_syn*.pt")
    if "images" not in roles or "targets" not in roles:
        raise UserError("import --format krr_st: give x_syn.pt and y_syn.pt (or the folder holding them)")
    return Foreign(_pt_tensor(roles["images"], "images"), _pt_tensor(roles["targets"], "targets"),
                    [roles["images"].name, roles["targets"].name], str(roles["images"]), space="reference",
                    space_source="KRR-ST's code keeps x_syn as raw pixel/255")


def read_mkdt(paths: list[Path]) -> Foreign:
    """``images_<it>.pt``, ``labels_<it>.pt``, optional ``synlr_<it>.pt``; a folder: its last iteration."""
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        steps = (re.fullmatch(r"images_(\d+)\.pt", p.name) for p in folder.glob("images_*.pt"))
        its = sorted(int(m.group(1)) for m in steps if m)
        if not its:
            raise UserError(f"{folder}: no images_<iteration>.pt files (MKDT's distill.py output)")
        paths = [folder / f"images_{its[-1]}.pt", folder / f"labels_{its[-1]}.pt"]
        if (folder / f"synlr_{its[-1]}.pt").is_file():
            paths.append(folder / f"synlr_{its[-1]}.pt")
    roles = _by_role(paths, "mkdt", {"images": lambda n: n.startswith("images"),
                                     "targets": lambda n: n.startswith("labels"),
                                     "lr": lambda n: "lr" in n.lower()},
                     "images_<it>.pt, labels_<it>.pt and optionally synlr_<it>.pt")
    if "images" not in roles or "targets" not in roles:
        raise UserError("import --format mkdt: give images_<it>.pt and labels_<it>.pt (and optionally synlr_<it>.pt), "
                        "or the folder holding them")
    lr = _scalar(_pt_tensor(roles["lr"], "learning rate"), str(roles["lr"])) if "lr" in roles else None
    return Foreign(_pt_tensor(roles["images"], "images"), _pt_tensor(roles["targets"], "targets"),
                    [p.name for p in roles.values()], str(roles["images"]), lr=lr, space="normalized",
                    space_source="MKDT normalises with the dataset's mean/std", hint=MKDT_STATS_HINT)


def _npz_text(archive: np.lib.npyio.NpzFile, key: str, path: Path) -> str | None:
    if key not in archive.files:
        return None
    value = npz_array(archive, key, path)
    if value.dtype.kind not in "US" or value.size != 1:
        raise UserError(f"{path}: '{key}' must be one string, got {value.dtype} {tuple(value.shape)}")
    return str(value.reshape(()).item())


def _npz_floats(archive: np.lib.npyio.NpzFile, key: str, path: Path) -> list[float] | None:
    if key not in archive.files:
        return None
    value = npz_array(archive, key, path)
    if value.dtype.kind not in "fiu" or value.ndim > 1:
        raise UserError(f"{path}: '{key}' must be a 1-D array of numbers, got {value.dtype} {tuple(value.shape)}")
    return [float(v) for v in value.reshape(-1)]


def _recorded(archive: np.lib.npyio.NpzFile, path: Path, found: Foreign) -> Foreign:
    """The facts an ssdd export records beside its arrays (space, statistics, objective, lr, metadata)."""
    space = _npz_text(archive, "image_space", path)
    if space is not None and space not in ("reference", "normalized"):
        raise UserError(f"{path}: 'image_space' must be reference or normalized, got {space!r}")
    if space is not None:
        found.space, found.space_source = space, f"recorded in {path.name}"
    found.mean, found.std = _npz_floats(archive, "mean", path), _npz_floats(archive, "std", path)
    found.objective = _npz_text(archive, "objective", path)
    if "lr" in archive.files:
        found.lr = _scalar(npz_array(archive, "lr", path), f"{path}:lr")
    if "view_targets" in archive.files:
        found.views = _npz_text(archive, "views", path) or "none"
        found.view_targets = torch.from_numpy(np.ascontiguousarray(npz_array(archive, "view_targets", path)))
    text = _npz_text(archive, "meta", path)
    if text:
        try:
            meta = json.loads(text)
        except json.JSONDecodeError:
            raise UserError(f"{path}: 'meta' is not valid JSON") from None
        found.meta.update({k: meta[k] for k in ("model_spec", "class_names") if isinstance(meta, dict) and k in meta})
        if isinstance(meta, dict) and "method" in meta:
            found.meta["original_method"] = meta["method"]
    return found


def read_npz(paths: list[Path]) -> Foreign:
    path = _single(paths, "npz", ".npz archive")
    if not path.is_file():
        raise UserError(f"{path}: not a file (npz expects an .npz archive)")
    with open_npz(path) as archive:
        keys = archive.files
        x_key = next((k for k in ("images", "x") if k in keys), None)
        if x_key is None:
            raise UserError(f"{path}: no image array (expected 'images' or 'x'; has {', '.join(keys) or 'nothing'})")
        x = npz_array(archive, x_key, path)
        y_key = next((k for k in ("targets", "labels", "y") if k in keys), None)
        y = npz_array(archive, y_key, path) if y_key else None
        if x.dtype.kind not in "fiub":
            raise UserError(f"{path}:{x_key}: images must be numbers, got {x.dtype}")
        pixels = x.dtype == np.uint8
        if pixels:
            x = to_nchw(x, f"{path}:{x_key}").astype(np.float32) / 255
        elif x.ndim == 3:
            x = x[:, None]
        if y is not None and y.dtype.kind not in "fiub":
            raise UserError(f"{path}:{y_key}: targets must be numbers, got {y.dtype}")
        found = Foreign(torch.from_numpy(np.ascontiguousarray(x)), None if y is None else torch.from_numpy(y),
                         [path.name], str(path), pixels=pixels)
        return _recorded(archive, path, found)


def _read_image(path: Path) -> np.ndarray:
    """One image file as (H, W, C) uint8, C = 1 for grayscale modes, else 3 (RGB)."""
    try:
        with Image.open(path) as im:
            gray = im.mode in ("1", "L", "LA", "I", "I;16", "F")
            return np.asarray(im.convert("L" if gray else "RGB"), dtype=np.uint8).reshape(im.size[1], im.size[0], -1)
    except Exception as err:  # OSError (truncated, not an image), DecompressionBombError, ...
        raise UserError(f"{path}: unreadable image ({one_line(err) or type(err).__name__})") from None


def _listing(folder: Path) -> tuple[list[Path], list[Path]]:
    """(sub-folders, image files) of a folder, sorted by name, hidden entries skipped."""
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as err:
        raise UserError(f"{folder}: cannot list folder ({err.strerror or err})") from None
    images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return [p for p in entries if p.is_dir()], images


def _stack(files: list[Path]) -> torch.Tensor:
    arrays = [_read_image(p) for p in files]
    channels = max(a.shape[2] for a in arrays)
    arrays = [np.repeat(a, channels, axis=2) if a.shape[2] != channels else a for a in arrays]
    for path, a in zip(files, arrays):
        if a.shape != arrays[0].shape:
            raise UserError(f"{path}: image is {a.shape[1]}x{a.shape[0]}, the first ({files[0].name}) is "
                            f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; a set's images share one size")
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy()).float() / 255


def read_imagefolder(paths: list[Path]) -> Foreign:
    folder = _single(paths, "imagefolder", "folder")
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (imagefolder expects class sub-folders, or images + {TARGETS_FILE})")
    dirs, files = _listing(folder)
    targets_file = folder / TARGETS_FILE
    if targets_file.is_file():
        with open_npz(targets_file) as archive:
            names = None
            if "files" in archive.files:
                raw = npz_array(archive, "files", targets_file)
                if raw.dtype.kind not in "US" or raw.ndim != 1:
                    raise UserError(f"{targets_file}: 'files' must be a 1-D array of file names")
                names = [str(n) for n in raw.tolist()]
                missing = [n for n in names if not (folder / n).is_file() or Path(n).name != n]
                if missing:
                    raise UserError(f"{folder / missing[0]}: listed in {TARGETS_FILE} but not in the folder")
                files = [folder / n for n in names]
            key = next((k for k in ("targets", "labels", "y") if k in archive.files), None)
            if key is None:
                raise UserError(f"{targets_file}: no 'targets' (or 'labels', 'y') array")
            y = npz_array(archive, key, targets_file)
            if y.dtype.kind not in "fiub":
                raise UserError(f"{targets_file}:{key}: targets must be numbers, got {y.dtype}")
            if not files:
                raise UserError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) beside {TARGETS_FILE}")
            found = Foreign(_stack(files), torch.from_numpy(y), [f.name for f in files] + [TARGETS_FILE],
                             str(folder), pixels=True)
            return _recorded(archive, targets_file, found)
    if dirs and files:
        raise UserError(f"{folder}: holds both images and sub-folders; use class sub-folders only, "
                        f"or a flat folder with a {TARGETS_FILE}")
    if dirs:
        per_class = []
        for d in dirs:
            images = _listing(d)[1]
            if not images:
                raise UserError(f"{d}: class folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            per_class.append(images)
        all_files = [p for images in per_class for p in images]
        labels = torch.tensor([c for c, images in enumerate(per_class) for _ in images])
        found = Foreign(_stack(all_files), labels, [str(p.relative_to(folder)) for p in all_files], str(folder),
                         pixels=True)
        found.meta["class_names"] = [d.name for d in dirs]
        return found
    if not files:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) and no class sub-folders")
    return Foreign(_stack(files), None, [f.name for f in files], str(folder), pixels=True)


READERS: dict[str, Callable[[list[Path]], Foreign]] = {
    "krr_st": read_krr_st, "mkdt": read_mkdt, "npz": read_npz, "imagefolder": read_imagefolder}
# "hf" is read by ssdd.interop.hf (which builds on this module's Foreign): ssdd.interop.convert dispatches to it

