"""Distilled sets across tools: import other codes' sets into ssdd's artifact, export ours, and a
``torch.utils.data.Dataset`` view for training code that is not ssdd's.

Formats in (``import_set``):

- ``krr_st``: the KRR-ST reference code's ``x_syn.pt`` (N,C,H,W floats) and ``y_syn.pt`` (N,d target
  vectors, or integer labels for its baselines). Its images stay in raw [0, 1] pixel space
  (``reference`` space): the code initialises ``x_syn`` from the un-normalised loader batch and
  normalises only the real images.
- ``mkdt``: MKDT's ``images_<it>.pt`` / ``labels_<it>.pt`` (target representations) and optional
  ``synlr_<it>.pt`` (the learned learning rate). Its images are normalised with the dataset's
  mean/std (``transforms.Normalize`` in its ``get_dataset``), so they need ``--mean``/``--std``.
- ``npz``: ``images`` (or ``x``), ``targets``/``labels`` (or ``y``), optional ``lr``; read with
  ``allow_pickle=False``.
- ``imagefolder``: image files in class sub-folders (labels become one-hot targets), or a flat folder
  with a ``targets.npz`` (what ``export_set`` writes), or a flat folder alone (images only: the set is
  pre-trained self-supervised, like ssdd's ``barlow_twins`` sets).

Every ``.pt`` file is read with ``torch.load(weights_only=True)``: a pickle that would run code is
refused. Formats out (``export_set``): ``imagefolder`` (PNGs in pixel space + ``targets.npz``) and
``npz`` (exact float arrays and the metadata).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ssdd import artifacts
from ssdd.data.formats.common import one_line
from ssdd.data.formats.npz import npz_array, open_npz, to_nchw
from ssdd.errors import UserError

log = logging.getLogger("ssdd")

FORMATS_IN = ("krr_st", "mkdt", "npz", "imagefolder")
FORMATS_OUT = ("imagefolder", "npz")
IMAGE_SPACES = ("auto", "raw", "reference", "normalized")
OBJECTIVES = ("auto", "mse", "cross_entropy")
TARGETS_FILE = "targets.npz"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# The notes ssdd's own sets carry (pipeline._save_set), so an imported set reads the same.
SPACE_NOTES = {"normalized": "normalised: (pixel/255 - mean) / std",
               "reference": "reference: raw pixel/255 in [0,1], not normalised (as the reference code)"}
# Statistics MKDT normalises with (its utils.get_dataset), quoted in the error that asks for them.
MKDT_STATS_HINT = ("MKDT's CIFAR-10: --mean 0.4914 0.4822 0.4465 --std 0.2023 0.1994 0.2010; "
                   "CIFAR-100: --mean 0.5071 0.4865 0.4409 --std 0.2009 0.1984 0.2023")


@dataclass
class _Foreign:
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


def read_krr_st(paths: list[Path]) -> _Foreign:
    """``x_syn.pt`` + ``y_syn.pt`` (or the folder holding them), as the reference code's Logger saves them."""
    if len(paths) == 1 and paths[0].is_dir():
        paths = [paths[0] / "x_syn.pt", paths[0] / "y_syn.pt"]
    roles = _by_role(paths, "krr_st", {"images": lambda n: n.startswith("x_syn"),
                                       "targets": lambda n: n.startswith("y_syn")}, "x_syn*.pt and y_syn*.pt")
    if "images" not in roles or "targets" not in roles:
        raise UserError("import --format krr_st: give x_syn.pt and y_syn.pt (or the folder holding them)")
    return _Foreign(_pt_tensor(roles["images"], "images"), _pt_tensor(roles["targets"], "targets"),
                    [roles["images"].name, roles["targets"].name], str(roles["images"]), space="reference",
                    space_source="KRR-ST's code keeps x_syn as raw pixel/255")


def read_mkdt(paths: list[Path]) -> _Foreign:
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
    return _Foreign(_pt_tensor(roles["images"], "images"), _pt_tensor(roles["targets"], "targets"),
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


def _recorded(archive: np.lib.npyio.NpzFile, path: Path, found: _Foreign) -> _Foreign:
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


def read_npz(paths: list[Path]) -> _Foreign:
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
        found = _Foreign(torch.from_numpy(np.ascontiguousarray(x)), None if y is None else torch.from_numpy(y),
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


def read_imagefolder(paths: list[Path]) -> _Foreign:
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
            found = _Foreign(_stack(files), torch.from_numpy(y), [f.name for f in files] + [TARGETS_FILE],
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
        found = _Foreign(_stack(all_files), labels, [str(p.relative_to(folder)) for p in all_files], str(folder),
                         pixels=True)
        found.meta["class_names"] = [d.name for d in dirs]
        return found
    if not files:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) and no class sub-folders")
    return _Foreign(_stack(files), None, [f.name for f in files], str(folder), pixels=True)


READERS: dict[str, Callable[[list[Path]], _Foreign]] = {
    "krr_st": read_krr_st, "mkdt": read_mkdt, "npz": read_npz, "imagefolder": read_imagefolder}


# ---- ssdd's conventions ---------------------------------------------------------------------

def _images(found: _Foreign) -> torch.Tensor:
    x = found.images
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or min(x.shape) == 0:
        raise UserError(f"{found.where}: images must be (N,C,H,W) (or (N,H,W)), got shape {tuple(found.images.shape)}")
    if x.dtype == torch.bool or x.dtype.is_complex:
        raise UserError(f"{found.where}: images must be real numbers, got {x.dtype}")
    x = x.float()
    if not torch.isfinite(x).all():
        raise UserError(f"{found.where}: images hold NaN or inf values")
    return x.contiguous()


def _channel_stats(values: Sequence[float] | None, channels: int, name: str) -> list[float] | None:
    if values is None:
        return None
    values = [float(v) for v in values]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels or not all(np.isfinite(values)):
        raise UserError(f"--{name}: expected {channels} finite values (one per channel) or one, got {len(values)}")
    return values


def resolve_space(found: _Foreign, images: torch.Tensor, image_space: str, mean: Sequence[float] | None,
                  std: Sequence[float] | None) -> tuple[torch.Tensor, str, list[float], list[float], str]:
    """The artifact's image space and statistics. Precedence: ``--image-space``, then what the file
    records, then what its format's code implies (KRR-ST: reference, MKDT: normalised), then the
    values (all within [0, 1]: reference; else normalised). Pixel data (PNGs, uint8 arrays) is read
    as pixel/255; asked for ``normalized`` it is stored normalised with the given mean/std.
    Returns (images, space, mean, std, how the space was decided)."""
    if image_space not in IMAGE_SPACES:
        raise UserError(f"--image-space must be one of {', '.join(IMAGE_SPACES)}, got {image_space!r}")
    c = images.shape[1]
    mean_, std_ = _channel_stats(mean, c, "mean"), _channel_stats(std, c, "std")
    if (mean_ is None) != (std_ is None):
        raise UserError("--mean and --std go together: give both or neither")
    if mean_ is None and found.mean is not None and found.std is not None:
        mean_, std_ = _channel_stats(found.mean, c, "mean"), _channel_stats(found.std, c, "std")
    if std_ is not None and min(std_) <= 0:
        raise UserError(f"--std: every value must be positive, got {std_}")
    in_unit = bool(images.min() >= 0 and images.max() <= 1)
    if image_space != "auto":
        space, how = ("reference" if image_space == "raw" else image_space), "given"
    elif found.space is not None:
        space, how = found.space, found.space_source
    elif found.pixels or in_unit:
        space, how = "reference", "detected: values within [0, 1]"
    else:
        space, how = "normalized", "detected: values outside [0, 1]"
    if space == "normalized" and mean_ is None:
        hint = f" ({found.hint})" if found.hint else ""
        raise UserError(f"{found.where}: images are in normalised space ({how}); give the --mean and --std they were "
                        f"normalised with, or --image-space raw if they are pixel/255{hint}")
    if found.pixels and space == "normalized":
        images = (images - torch.tensor(mean_).view(1, -1, 1, 1)) / torch.tensor(std_).view(1, -1, 1, 1)
    if mean_ is None:  # reference space: informational only, so the images' own statistics
        flat = images.clamp(0, 1).transpose(0, 1).reshape(c, -1).double()
        mean_ = flat.mean(1).tolist()
        std_ = torch.std(flat, 1, correction=0).clamp_min(1e-3).tolist()
        how += "; mean/std: the images' own"
    return images, space, mean_, std_, how


def resolve_targets(targets: torch.Tensor | None, n: int, where: str, objective: str = "auto",
                    recorded: str | None = None, num_classes: int | None = None) -> tuple[torch.Tensor, str]:
    """ssdd's targets and objective: integer labels or one-hot rows -> one-hot class probabilities
    with ``cross_entropy``; real-valued vectors -> ``mse``; no targets -> ``barlow_twins`` (m, 0)."""
    if objective not in OBJECTIVES:
        raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if targets is None or (targets.ndim == 2 and targets.shape[1] == 0):
        if targets is not None and len(targets) != n:
            raise UserError(f"{where}: {n} images but {len(targets)} targets")
        if objective != "auto":
            raise UserError(f"{where}: --objective {objective} needs targets, and this set has none")
        return torch.zeros(n, 0), "barlow_twins"
    if targets.dtype == torch.bool:
        targets = targets.long()
    if targets.dtype.is_complex or targets.ndim not in (1, 2):
        raise UserError(f"{where}: targets must be labels (N,) or vectors (N,d), got {targets.dtype} "
                        f"{tuple(targets.shape)}")
    if len(targets) != n:
        raise UserError(f"{where}: {n} images but {len(targets)} targets")
    if not torch.isfinite(targets.double()).all():
        raise UserError(f"{where}: targets hold NaN or inf values")
    if targets.ndim == 1:
        labels = targets.double()
        if (labels != labels.round()).any() or (labels < 0).any():
            raise UserError(f"{where}: 1-D targets must be class labels (non-negative integers)")
        labels = labels.long()
        classes = max(int(labels.max()) + 1, num_classes or 0)
        rows = torch.nn.functional.one_hot(labels, classes).float()
        return rows, ("cross_entropy" if objective == "auto" else objective)
    rows = targets.float()
    one_hot = bool(((rows == 0) | (rows == 1)).all() and (rows.sum(1) == 1).all())
    if not targets.dtype.is_floating_point and not one_hot:
        raise UserError(f"{where}: integer 2-D targets must be one-hot rows, got values outside 0/1")
    if objective == "auto":
        objective = recorded if recorded in ("mse", "cross_entropy") else ("cross_entropy" if one_hot else "mse")
    if objective == "cross_entropy" and not one_hot:
        if (rows < 0).any() or not torch.allclose(rows.sum(1), torch.ones(n), atol=1e-3):
            raise UserError(f"{where}: cross_entropy targets must be class probabilities (non-negative rows "
                            "summing to 1); use --objective mse for real-valued target vectors")
    return rows, objective


def import_set(files: Sequence[str | os.PathLike], fmt: str, out: str | os.PathLike, image_space: str = "auto",
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None, objective: str = "auto",
               method: str | None = None) -> Path:
    """Convert another tool's distilled set into an ssdd distilled-set artifact at ``out`` (written
    atomically), with the metadata ssdd's own sets carry, so ``pretrain --distilled`` treats it alike."""
    if fmt not in READERS:
        raise UserError(f"import: unknown --format {fmt!r} (expected {', '.join(FORMATS_IN)})")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give the file to write (e.g. {out}/NAME.safetensors)")
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.exists():
            raise UserError(f"{path}: not found")
    found = READERS[fmt](paths)
    images = _images(found)
    images, space, mean_, std_, how = resolve_space(found, images, image_space, mean, std)
    classes = len(found.meta["class_names"]) if isinstance(found.meta.get("class_names"), list) else None
    targets, objective_ = resolve_targets(found.targets, len(images), found.where, objective, found.objective, classes)
    meta = {"method": method or out.stem, "objective": objective_, "lr": found.lr, "image_space": space,
            "image_space_note": SPACE_NOTES[space], "mean": mean_, "std": std_,
            "imported_from": {"format": fmt, "files": found.files, "image_space": how}, **found.meta}
    artifacts.save_distilled(out, images, targets, meta)
    log.info("imported %d images %s, targets %s (%s), %s space (%s)%s -> %s", len(images), list(images.shape[1:]),
             list(targets.shape[1:]), objective_, space, how, f", lr {found.lr:g}" if found.lr is not None else "", out)
    return out


# ---- export -----------------------------------------------------------------------------------

def to_unit(images: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """Images mapped to pixel/255 space with the set's recorded space and statistics (not clipped)."""
    x = images.float()
    if meta.get("image_space") != "normalized":
        return x
    c = x.shape[1]
    mean, std = _channel_stats(meta.get("mean"), c, "mean"), _channel_stats(meta.get("std"), c, "std")
    if mean is None or std is None:
        raise UserError("the set's images are normalised but its metadata records no mean/std")
    return x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)


def to_pixels(images: torch.Tensor, meta: dict[str, Any]) -> tuple[np.ndarray, float]:
    """Images as (N,H,W,C) uint8 pixels, and the fraction of values outside [0, 1] that were clipped."""
    x = to_unit(images, meta)
    clipped = float(((x < 0) | (x > 1)).float().mean())
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), clipped


def _replaceable(folder: Path) -> bool:
    """An existing --out folder may be replaced only when empty or an earlier export (images + targets.npz)."""
    dirs, images = _listing(folder)
    others = [p for p in folder.iterdir() if p.is_file() and p.name != TARGETS_FILE and p not in images]
    return not dirs and not others and (not images or (folder / TARGETS_FILE).is_file())


def _write_folder(out: Path, fill: Callable[[Path], None]) -> None:
    """Fill a temporary folder beside ``out``, then rename it onto ``out``: never a half-written export."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; imagefolder writes a folder")
    if out.is_dir() and not _replaceable(out):
        raise UserError(f"--out {out}: folder exists and is not an earlier export; choose a new or empty folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as err:
        raise UserError(f"--out {out}: cannot write into {out.parent} ({err.strerror or err})") from None
    old = None
    try:
        fill(tmp)
        if out.exists():  # an earlier export: moved aside, put back if the rename fails
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / out.name).exists() and not out.exists():
            os.replace(old / out.name, out)
        if isinstance(err, OSError):
            raise UserError(f"--out {out}: write failed ({err.strerror or err})") from None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:  # a file object: np.savez would append ".npz" to a name
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())


def _facts(targets: torch.Tensor, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays both export formats carry beside the images (what import reads back)."""
    facts = {"targets": targets.float().numpy(), "objective": np.array(str(meta.get("objective", "mse"))),
             "image_space": np.array(str(meta.get("image_space", "reference"))),
             "meta": np.array(json.dumps({k: v for k, v in meta.items() if k != "fingerprint"}))}
    for key in ("mean", "std"):
        if meta.get(key) is not None:
            facts[key] = np.asarray(meta[key], dtype=np.float64).reshape(-1)
    if meta.get("lr") is not None:
        facts["lr"] = np.array(float(meta["lr"]))
    return facts


def export_set(distilled: str | os.PathLike, fmt: str, out: str | os.PathLike) -> Path:
    """Write a distilled set for other tools: ``imagefolder`` (PNGs in [0, 1] pixel space quantised to
    uint8, plus ``targets.npz``: targets, objective, lr and the set's image space) or ``npz`` (the
    exact float images and targets, lr and metadata). Returns what was written."""
    if fmt not in FORMATS_OUT:
        raise UserError(f"export: unknown --format {fmt!r} (expected {', '.join(FORMATS_OUT)})")
    images, targets, meta = artifacts.load_distilled(distilled)
    out = Path(out)
    if fmt == "npz":
        if out.suffix != ".npz":
            out = out / f"{Path(distilled).stem}.npz"
        if out.is_dir():
            raise UserError(f"--out {out}: is a folder")
        with artifacts.atomic_path(out) as tmp:
            _save_npz(tmp, {"images": images.numpy(), **_facts(targets, meta)})
        log.info("exported %d images and targets %s -> %s", len(images), list(targets.shape[1:]), out)
        return out
    if images.shape[1] not in (1, 3):
        raise UserError(f"{distilled}: PNG export needs 1 or 3 channels, the images have {images.shape[1]}; "
                        "use --format npz")
    pixels, clipped = to_pixels(images, meta)
    width = max(5, len(str(len(pixels) - 1)))
    names = [f"{i:0{width}d}.png" for i in range(len(pixels))]

    def fill(folder: Path) -> None:
        for name, px in zip(names, pixels):
            with open(folder / name, "wb") as fh:
                Image.fromarray(px[:, :, 0] if px.shape[2] == 1 else px).save(fh, format="PNG")
                fh.flush()
                os.fsync(fh.fileno())
        _save_npz(folder / TARGETS_FILE, {"files": np.array(names), **_facts(targets, meta)})

    _write_folder(out, fill)
    if clipped > 0:
        log.info("export: %.2f %% of pixel values fell outside [0, 1] and were clipped in the PNGs "
                 "(use --format npz for the exact values)", 100 * clipped)
    log.info("exported %d PNGs and %s -> %s", len(pixels), TARGETS_FILE, out)
    return out


# ---- a Dataset for other training code -------------------------------------------------------

class DistilledDataset(torch.utils.data.Dataset):
    """A distilled set as ``(image, target)`` float tensors, images in the set's own ``image_space``
    (``"normalized"``: (pixel/255 - mean)/std; ``"reference"``: pixel/255), so a model trains on
    exactly what ssdd's pre-training sees. ``objective`` says how to use the targets: ``mse``
    (regress onto them), ``cross_entropy`` (class probabilities) or ``barlow_twins`` (no targets)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.images, self.targets, self.meta = artifacts.load_distilled(self.path)
        self.image_space: str = str(self.meta.get("image_space", "reference"))
        c = self.images.shape[1]
        self.mean: list[float] = _channel_stats(self.meta.get("mean"), c, "mean") or [0.0] * c
        self.std: list[float] = _channel_stats(self.meta.get("std"), c, "std") or [1.0] * c
        self.objective: str = str(self.meta.get("objective", "mse"))
        lr = self.meta.get("lr")
        self.lr: float | None = float(lr) if lr is not None else None
        self.method: str = str(self.meta.get("method", self.path.stem))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.targets[index]

    def pixels(self) -> torch.Tensor:
        """All images in [0, 1] pixel space (un-normalised, clipped), e.g. to apply your own normalisation."""
        return to_unit(self.images, self.meta).clamp(0, 1)

    def __repr__(self) -> str:
        return (f"DistilledDataset({str(self.path)!r}: {len(self)} images {list(self.images.shape[1:])}, targets "
                f"{list(self.targets.shape[1:])}, objective={self.objective}, image_space={self.image_space}, "
                f"lr={self.lr})")


def load_distilled(path: str | os.PathLike) -> DistilledDataset:
    """A distilled-set artifact (ssdd's own or imported) as a ``torch.utils.data.Dataset``."""
    return DistilledDataset(path)
