"""Folders of image files: ``root/<class>/*.png|jpg`` and the Tiny-ImageNet layouts (raw:
``train/<wnid>/images/``, ``val/images/`` + ``val_annotations.txt``; or sorted into
``train/<wnid>/`` and ``val/<wnid>/``), with ``wnids.txt`` for class order and ``words.txt`` for
readable names. Images are decoded with Pillow in a thread pool (decoding releases the GIL)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ssdd.data.dataset import ImageSet
from ssdd.data.formats.common import finish, first_per_class, one_line
from ssdd.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _entries(folder: Path) -> tuple[list[str], list[str]]:
    """(sub-folder names, image file names) of a folder, both sorted, hidden entries skipped."""
    dirs, images = [], []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    dirs.append(entry.name)
                elif entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES):
                    images.append(entry.name)
    except OSError as err:
        raise UserError(f"{folder}: cannot list folder ({err.strerror or err})") from None
    return sorted(dirs), sorted(images)


def _class_images(folder: Path) -> list[Path]:
    """Images of one class folder: directly inside it, or in its ``images/`` sub-folder (raw Tiny-ImageNet)."""
    dirs, images = _entries(folder)
    if not images and "images" in dirs:
        folder = folder / "images"
        images = _entries(folder)[1]
    if not images:
        raise UserError(f"{folder}: class folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [folder / name for name in images]


def _read_lines(file: Path) -> list[str]:
    try:
        return file.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as err:
        raise UserError(f"{file}: cannot read ({err.strerror or err})") from None


def _wnids(root: Path) -> list[str] | None:
    file = root / "wnids.txt"
    if not file.is_file():
        return None
    wnids = [line.strip() for line in _read_lines(file) if line.strip()]
    if not wnids:
        raise UserError(f"{file}: lists no classes")
    if len(set(wnids)) != len(wnids):
        raise UserError(f"{file}: lists a class more than once")
    return wnids


def _readable_names(root: Path, classes: list[str]) -> list[str]:
    """words.txt lines are ``wnid<TAB>name, synonym, ...``; keep the first name."""
    file = root / "words.txt"
    if not file.is_file():
        return classes
    wanted, words = set(classes), {}
    for line in _read_lines(file):
        wnid, _, text = line.partition("\t")
        if wnid in wanted:
            words[wnid] = text.split(",")[0].strip()
    return [words.get(c) or c for c in classes]


def _check_folders(base: Path, folders: list[str], classes: list[str], source: str, exact: bool) -> None:
    known, present = set(classes), set(folders)
    unknown = [f for f in folders if f not in known]
    if unknown:
        raise UserError(f"{base}: {len(unknown)} class folders not listed in {source} "
                        f"({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''})")
    missing = [c for c in classes if c not in present]
    if exact and missing:
        raise UserError(f"{base}: no folder for {len(missing)} classes listed in {source} "
                        f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")


def _annotated(base: Path, classes: list[str], source: str) -> tuple[list[Path], list[int]]:
    """Raw Tiny-ImageNet val: ``images/*`` labelled by ``val_annotations.txt`` (file TAB wnid ...)."""
    file, index = base / "val_annotations.txt", {c: i for i, c in enumerate(classes)}
    pairs = []
    for number, line in enumerate(_read_lines(file), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise UserError(f"{file}: line {number} is not 'file<TAB>wnid'")
        if parts[1] not in index:
            raise UserError(f"{file}: line {number} names class {parts[1]}, not in {source}")
        image = base / "images" / parts[0]
        if not image.is_file():
            raise UserError(f"{file}: line {number} names {image}, which does not exist")
        pairs.append((index[parts[1]], parts[0], image))
    if not pairs:
        raise UserError(f"{file}: no annotations")
    pairs.sort(key=lambda p: (p[0], p[1]))  # class-major, then file name: like the class-folder layout
    return [p[2] for p in pairs], [p[0] for p in pairs]


def decode_image(path: Path, size: int) -> np.ndarray:
    """One image as (size, size, 3) uint8 RGB. Shrinking uses BOX (area average, as downsampled
    ImageNet was made); enlarging uses LANCZOS. Large JPEGs are decoded at a reduced scale first."""
    try:
        with Image.open(path) as im:
            if im.format == "JPEG" and min(im.size) >= 2 * size:
                im.draft("RGB", (size, size))
            im = im.convert("RGB")
            if im.size != (size, size):
                shrink = im.size[0] >= size and im.size[1] >= size
                im = im.resize((size, size), Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8)
    except UserError:
        raise
    except Exception as err:  # OSError (truncated, not an image), DecompressionBombError, ...
        raise UserError(f"{path}: unreadable image ({one_line(err) or type(err).__name__})") from None


def decode_all(paths: list[Path], size: int, workers: int | None = None) -> torch.Tensor:
    """Decode into one (N,3,size,size) uint8 tensor, blocks of files per thread."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def work(start: int) -> None:
        for i in range(start, min(start + 256, len(paths))):
            out[i] = decode_image(paths[i], size)

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(work, s) for s in range(0, len(paths), 256)]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _pick_split(root: Path, split: str) -> tuple[Path, dict[str, Path]]:
    splits = {n: root / n for n in ("train", "val", "test") if (root / n).is_dir()}
    if not splits:
        if split != "train":
            raise UserError(f"{root}: no val/ or test/ folder, so this class-folder layout holds only split train")
        return root, splits
    if split == "train":
        options = ["train"]
    else:
        options = [split, "test" if split == "val" else "val"]
    for name in options:
        if name in splits:
            return splits[name], splits
    raise UserError(f"{root}: no {' or '.join(o + '/' for o in options)} folder for split {split} "
                    f"(has {', '.join(n + '/' for n in splits)})")


def read_imagefolder(root: Path, split: str, size: int, max_per_class: int | None) -> ImageSet:
    if not root.is_dir():
        raise UserError(f"{root}: not a folder (imagefolder expects root/<class>/<image files>)")
    base, splits = _pick_split(root, split)
    wnids = _wnids(root)
    folders, loose = _entries(base)
    annotated = (base / "val_annotations.txt").is_file() and (base / "images").is_dir()
    unlabelled = not annotated and (folders == ["images"] or (not folders and loose))
    # class order: wnids.txt, else the sorted train class folders (so val labels match train's)
    if wnids is not None:
        classes, source = wnids, str(root / "wnids.txt")
    elif "train" in splits and base != splits["train"]:
        classes, source = _entries(splits["train"])[0], str(splits["train"])
    else:
        classes, source = folders, str(base)

    labels: list[int] | None
    if annotated:
        paths, labels = _annotated(base, classes, source)
        if max_per_class is not None:
            keep = first_per_class(np.asarray(labels), max_per_class).tolist()
            paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    elif unlabelled:  # e.g. raw Tiny-ImageNet test/images: no labels published
        folder = base / "images" if folders == ["images"] else base
        paths, labels = [folder / n for n in _entries(folder)[1]], None
        paths = paths[:max_per_class] if max_per_class is not None else paths
    else:
        if not folders:
            raise UserError(f"{base}: no class folders (imagefolder expects {base}/<class>/<image files>)")
        _check_folders(base, folders, classes, source, exact=base == splits.get("train", root))
        index = {c: i for i, c in enumerate(classes)}
        paths, labels = [], []
        present = set(folders)
        for folder in (c for c in classes if c in present):  # label order
            files = _class_images(base / folder)[:max_per_class]
            paths += files
            labels += [index[folder]] * len(files)
    if not paths:
        raise UserError(f"{base}: no images")
    images = decode_all(paths, size)
    names = _readable_names(root, classes) if classes else None
    y = np.asarray(labels, dtype=np.int64) if labels is not None else None
    return finish(images, y, names, f"{root.name}-{split}", size, None, str(base))
