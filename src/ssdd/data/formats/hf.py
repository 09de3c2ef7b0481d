"""Hugging Face datasets: a ``save_to_disk`` folder (one Dataset, or a DatasetDict whose splits are the
dataset's splits), or a folder or glob of parquet files. A folder's splits follow the Hub's file naming
(``data/train-00000-of-00001.parquet``, ``test/*.parquet``, ...); a glob or a single file is one split.

Rows go through the optional ``datasets`` library in streaming batches, so a set larger than memory is
never loaded whole: a batch's labels pick the rows to keep (the per-class cap) before any image is
decoded, and only the output, uint8 at the requested size, is held. ``datasets`` is imported on first use
so that ssdd works without it."""

from __future__ import annotations

import glob
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ssdd.data.dataset import ImageSet
from ssdd.data.formats.common import finish, first_per_class, one_line
from ssdd.errors import UserError

IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels")
# Split names a held-out request accepts, in order of preference (the Hub spells validation several ways).
HELD_OUT = {"test": ("test", "validation", "valid", "val", "dev"),
            "val": ("validation", "valid", "val", "dev", "test")}
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
BATCH = 256
NO_LABELS = "none"
INSTALL = "pip install 'ssdd[hf]' (in a checkout: pip install -e '.[hf]')"


def require_datasets(what: str = "format hf") -> ModuleType:
    """The ``datasets`` module, or a one-line UserError saying how to install the extra."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{what} needs the optional `datasets` package: {INSTALL}") from None
    return datasets


def parse_options(text: str, where: str) -> dict[str, str]:
    """``image=COL,label=COL`` (the bracket of a spec ``hf[...]:PATH``) as read_hf's keyword arguments."""
    keys, out = {"image": "image_column", "label": "label_column"}, {}
    for part in (p.strip() for p in text.split(",")):
        key, sep, value = (s.strip() for s in part.partition("="))
        if key not in keys or not sep or not value:
            raise UserError(f"{where}: hf options are image=COLUMN and label=COLUMN, comma-separated; got {part!r}")
        if keys[key] in out:
            raise UserError(f"{where}: hf option {key} given twice")
        out[keys[key]] = value
    return out


def has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


# ---- where the splits are ---------------------------------------------------------------------

@dataclass
class Located:
    """The splits of a path: split name -> a save_to_disk folder (``disk``) or parquet files."""

    splits: dict[str, Any]
    disk: bool


def _dict_splits(root: Path) -> dict[str, Path]:
    try:
        names = json.loads((root / "dataset_dict.json").read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{root}/dataset_dict.json: unreadable ({one_line(err)})") from None
    if not isinstance(names, list) or not names:
        raise UserError(f"{root}/dataset_dict.json: lists no splits")
    missing = [n for n in names if not (root / str(n)).is_dir()]
    if missing:
        raise UserError(f"{root}: no folder for split {missing[0]} listed in dataset_dict.json")
    return {str(n): root / str(n) for n in names}


def _parquet_splits(root: Path) -> dict[str, list[str]]:
    """The folder's parquet files by split, by the Hub's naming conventions (through ``datasets``)."""
    require_datasets()
    from datasets.data_files import DataFilesDict, get_data_patterns
    try:
        found = DataFilesDict.from_patterns(get_data_patterns(str(root)), base_path=str(root))
    except Exception as err:
        if type(err).__name__ != "EmptyDatasetError":  # raised for a folder holding no files at all
            raise UserError(f"{root}: cannot list its data files ({one_line(err)})") from None
        found = {}
    splits = {str(name): sorted(f for f in files if f.endswith(".parquet")) for name, files in found.items()}
    splits = {name: files for name, files in splits.items() if files}
    if not splits:
        raise UserError(f"{root}: neither a save_to_disk folder (dataset_dict.json or state.json) nor a folder of "
                        "parquet files (format hf)")
    return splits


def locate(path: str) -> Located:
    if not path:
        raise UserError("format hf: give a PATH (hf:PATH)")
    root = Path(os.path.expanduser(path))
    if root.is_dir():
        if (root / "dataset_dict.json").is_file():
            return Located(_dict_splits(root), True)
        if (root / "state.json").is_file():
            return Located({"train": root}, True)
        return Located(_parquet_splits(root), False)
    if root.is_file():
        if root.suffix != ".parquet":
            raise UserError(f"{path}: format hf reads a save_to_disk folder, or a folder or glob of .parquet files")
        return Located({"train": [str(root)]}, False)
    if has_magic(str(root)):
        files = sorted(f for f in glob.glob(str(root), recursive=True) if f.endswith(".parquet") and os.path.isfile(f))
        if not files:
            raise UserError(f"{path}: matches no .parquet files")
        return Located({"train": files}, False)
    raise UserError(f"{path}: no such file or folder (for format hf)")


def pick_split(splits: dict[str, Any], split: str, where: str) -> str:
    """The dataset's own split for ``train``, ``val`` or ``test``; a set of one split has only ``train``."""
    if split == "train":
        if "train" in splits or len(splits) == 1:
            return "train" if "train" in splits else next(iter(splits))
        raise UserError(f"{where}: no train split (has {', '.join(splits)})")
    for name in HELD_OUT[split]:
        if name in splits:
            return name
    raise UserError(f"{where}: no split for {split} (looked for {', '.join(HELD_OUT[split])}; has {', '.join(splits)})")


def has_heldout(path: str) -> bool:
    """Whether the dataset has a test or validation split beside the one ``train`` reads."""
    splits = locate(path).splits
    if len(splits) < 2:
        return False
    train = pick_split(splits, "train", path)
    return any(name in splits and name != train for name in HELD_OUT["test"])


def describe_split(located: Located, name: str, where: str) -> tuple[int, Any]:
    """(number of rows, features) of one split, read from its metadata (no rows read)."""
    datasets = require_datasets()
    source = located.splits[name]
    try:
        if located.disk:
            if not json.loads((Path(source) / "state.json").read_text()).get("_data_files", True):
                raise UserError(f"{where}: the split is empty")  # saved with no rows: datasets cannot open it
            ds = datasets.load_from_disk(str(source))
            if not isinstance(ds, datasets.Dataset):
                raise UserError(f"{where}: expected one split's Dataset, found {type(ds).__name__}")
            return len(ds), ds.features
        import pyarrow.parquet as pq
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in source)
        return rows, datasets.Features.from_arrow_schema(pq.read_schema(source[0]))
    except UserError:
        raise
    except Exception as err:  # a corrupt arrow/parquet file, a schema datasets cannot read, ...
        raise UserError(f"{where}: unreadable ({one_line(err)[:200] or type(err).__name__})") from None


def stream_split(located: Located, name: str, columns: list[str], where: str) -> Any:
    """One split's ``columns`` to iterate in batches: a memory-mapped Dataset, or parquet streamed in
    batches of :data:`BATCH` rows that read only those columns from the files."""
    datasets = require_datasets()
    source = located.splits[name]
    try:
        if located.disk:
            return datasets.load_from_disk(str(source)).select_columns(columns)
        return datasets.load_dataset("parquet", data_files={"train": list(source)}, split="train", streaming=True,
                                     columns=columns, batch_size=BATCH)
    except Exception as err:
        raise UserError(f"{where}: unreadable ({one_line(err)[:200] or type(err).__name__})") from None


# ---- columns ------------------------------------------------------------------------------------

def _describe(feature: Any) -> str:
    text = one_line(repr(feature))
    return text if len(text) <= 60 else text[:57] + "..."


def _column(features: Any, wanted: str | None, defaults: tuple[str, ...], where: str) -> str | None:
    if wanted is not None:
        if wanted not in features:
            raise UserError(f"{where}: no column '{wanted}' (columns: {', '.join(features)})")
        return wanted
    return next((c for c in defaults if c in features), None)


def find_image_column(features: Any, wanted: str | None, where: str) -> str:
    """The image column: ``wanted``, else ``image`` or ``img``; an Image feature (or its bytes/path struct)."""
    datasets = require_datasets()
    name = _column(features, wanted, IMAGE_COLUMNS, where)
    if name is None:
        raise UserError(f"{where}: no image column ({' or '.join(IMAGE_COLUMNS)}; columns: {', '.join(features)}); "
                        "name it with --image-column COL, or hf[image=COL]:PATH in a spec")
    feature = features[name]
    struct = isinstance(feature, dict) and "bytes" in feature and set(feature) <= {"bytes", "path"}
    if not (isinstance(feature, datasets.Image) or struct):
        raise UserError(f"{where}: column '{name}' is not an image column (it holds {_describe(feature)})")
    return name


def find_label_column(features: Any, wanted: str | None, where: str) -> tuple[str | None, list[str] | None]:
    """(the label column or None, its class names when it is a ClassLabel): ``wanted``, else ``label``
    or ``labels``; integer class ids only. ``none`` reads the split unlabelled (e.g. STL-10's unlabeled
    split, whose labels are all -1)."""
    datasets = require_datasets()
    if wanted == NO_LABELS:
        return None, None
    name = _column(features, wanted, LABEL_COLUMNS, where)
    if name is None:
        return None, None
    feature = features[name]
    if isinstance(feature, datasets.ClassLabel):
        return name, [str(n) for n in feature.names]
    if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        return name, None
    raise UserError(f"{where}: label column '{name}' holds {_describe(feature)}, expected integer class ids "
                    "(a ClassLabel or integer column)")


# ---- decoding -----------------------------------------------------------------------------------

def _decode(decoder: Any, value: Any, where: str) -> Image.Image:
    """One row's image through ``datasets.Image``; a file path is read only when it is local."""
    if value is None:
        raise UserError(f"{where}: a row has no image")
    if isinstance(value, dict) and value.get("bytes") is None and value.get("path") and \
            not os.path.isfile(value["path"]):
        raise UserError(f"{where}: image file {value['path']} not found (remote images are never downloaded)")
    try:
        return decoder.decode_example(value)
    except Exception as err:  # truncated bytes, not an image, DecompressionBombError, ...
        raise UserError(f"{where}: unreadable image ({one_line(err)[:160] or type(err).__name__})") from None


def fit(image: Image.Image, size: int, gray: bool) -> np.ndarray:
    """(size, size) gray or (size, size, 3) RGB uint8, resized as the imagefolder reader does: BOX (area
    average) when shrinking, LANCZOS when enlarging."""
    image = image.convert("L" if gray else "RGB")
    if image.size != (size, size):
        shrink = image.size[0] >= size and image.size[1] >= size
        image = image.resize((size, size), Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def _convert(decoder: Any, values: list, out: np.ndarray, start: int, size: int, gray: bool, where: str) -> None:
    """Decode and fit one thread's share of a batch into ``out[start:]`` (decoding releases the GIL)."""
    for i, value in enumerate(values):
        pixels = fit(_decode(decoder, value, where), size, gray)
        out[start + i] = pixels[None] if gray else pixels.transpose(2, 0, 1)


def _labels(values: list, names: list[str] | None, where: str) -> np.ndarray:
    if any(v is None for v in values):
        raise UserError(f"{where}: a row has no label")
    y = np.asarray(values, dtype=np.int64)
    if len(y) and (y.min() < 0 or (names and y.max() >= len(names))):
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        known = f" of {len(names)} classes" if names else ""
        raise UserError(f"{where}: label {bad} is not a class id{known} "
                        "(unlabelled rows? use another split, or label=none)")
    return y


def short_name(path: str) -> str:
    """A name for tables and files: the last part of the path that is not a glob, less ``.parquet``."""
    parts = [p for p in Path(path.rstrip("/")).parts if not has_magic(p)]
    return Path(parts[-1]).stem if parts else "hf"


def read_hf(path: str, split: str, size: int, max_per_class: int | None, image_column: str | None = None,
            label_column: str | None = None, progress: bool = False) -> ImageSet:
    """One split as an ImageSet of size x size images (1 channel when the first batch is all grayscale)."""
    datasets = require_datasets()
    located = locate(path)
    name = pick_split(located.splits, split, path)
    where = f"{path} (split {name})"
    rows, features = describe_split(located, name, where)
    if rows == 0:
        raise UserError(f"{where}: the split is empty")
    image = find_image_column(features, image_column, where)
    label, names = find_label_column(features, label_column, where)
    ds = stream_split(located, name, [image] + ([label] if label else []), where)
    ds = ds.cast_column(image, datasets.Image(decode=False))
    bound = rows  # the most rows kept: known early when the cap and the classes are
    if max_per_class is not None and not label:
        bound = min(rows, max_per_class)
    elif max_per_class is not None and names:
        bound = min(rows, max_per_class * len(names))
    decoder, seen, kept, ys, gray = datasets.Image(), {}, 0, [], False
    out: np.ndarray | None = None
    workers = min(8, os.cpu_count() or 1)
    bar = tqdm(total=rows, desc=f"hf {short_name(path)} {name}", unit="img", disable=not progress,
               dynamic_ncols=True, leave=False)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            waiting: list = []  # the previous batch's jobs: decoding overlaps reading the next batch
            for batch in ds.iter(batch_size=BATCH):
                values = batch[image]
                keep = np.arange(len(values))
                if label:
                    y = _labels(batch[label], names, where)
                    if max_per_class is not None:
                        keep = first_per_class(y, max_per_class, seen)
                    ys.append(y[keep])
                elif max_per_class is not None:
                    keep = keep[:bound - kept]
                if kept + len(keep) > bound:
                    raise UserError(f"{where}: holds more rows than its files' metadata says ({rows})")
                chosen = [values[i] for i in keep]
                if out is None and chosen:  # the first batch decides: gray when all its images are
                    gray = all(_decode(decoder, v, where).mode in GRAY_MODES for v in chosen)
                    out = np.empty((bound, 1 if gray else 3, size, size), dtype=np.uint8)
                for future in waiting:
                    future.result()
                step = max(1, -(-len(chosen) // workers))
                waiting = [pool.submit(_convert, decoder, chosen[s:s + step], out, kept + s, size, gray, where)
                           for s in range(0, len(chosen), step)]
                kept += len(chosen)
                bar.update(len(values))
                if kept == bound and max_per_class is not None:
                    break  # every class (or the whole unlabelled cap) is full
            for future in waiting:
                future.result()
    except UserError:
        raise
    except Exception as err:  # a parquet/arrow read error in the middle of the stream
        raise UserError(f"{where}: unreadable ({one_line(err)[:200] or type(err).__name__})") from None
    finally:
        bar.close()
    if out is None or kept == 0:
        raise UserError(f"{where}: the split is empty")
    labels = np.concatenate(ys) if label else None
    return finish(torch.from_numpy(out[:kept]), labels, names, f"{short_name(path)}-{name}", size, None, where)
