"""Distilled sets as Hugging Face datasets (the optional ``datasets`` extra).

Out: a ``save_to_disk`` folder of one split with columns ``image`` (a PNG of the image in [0, 1] pixel
space, for viewers and other tools), ``image_exact`` (the exact float image in the set's own space, which
the PNG quantises) and ``targets`` (a float list per image). The set's lr, objective, image space,
statistics and metadata are JSON in the dataset info's ``description`` (``DatasetInfo`` has no free-form
field), under the key ``ssdd``.

In: such a folder reads back exactly. Any other dataset (a ``save_to_disk`` folder, a parquet file,
folder or glob) reads as its ``image``/``img`` column in pixel/255 space, with ``targets`` vectors or
``label``/``labels`` class ids when it has them."""

from __future__ import annotations

import io
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from ssdd import artifacts, distilled_set
from ssdd.data.formats import hf as hf_format
from ssdd.data.formats.common import one_line
from ssdd.errors import UserError
from ssdd.interop.pixels import check_png_folder_out, to_pixels
from ssdd.interop.readers import Foreign, _single

log = logging.getLogger("ssdd")

EXACT, TARGETS, INFO_KEY = "image_exact", "targets", "ssdd"


@contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """No ``datasets`` progress bars inside (saving a few images needs none); the caller's setting after."""
    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


def _png(pixels: np.ndarray) -> dict[str, Any]:
    buffer = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def facts(artifact: distilled_set.DistilledArtifact) -> dict[str, Any]:
    """What the dataset info records: the set's fields, and its metadata less its fingerprint."""
    return {"objective": artifact.objective, "image_space": artifact.image_space, "mean": artifact.mean,
            "std": artifact.std, "lr": artifact.lr,
            "meta": {k: v for k, v in artifact.recorded.items() if k != "fingerprint"}}


def _earlier_export(folder: Path) -> bool:
    """An --out folder may be replaced only when empty or an earlier ``--format hf`` export."""
    if not any(folder.iterdir()):
        return True
    try:
        info = json.loads((folder / "dataset_info.json").read_text())
        return INFO_KEY in json.loads(info.get("description") or "{}") and (folder / "state.json").is_file()
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def export_hf(artifact: distilled_set.DistilledArtifact, out: Path) -> Path:
    """Write ``artifact`` as a ``save_to_disk`` folder at ``out`` (atomically); returns ``out``."""
    datasets = hf_format.require_datasets("export --format hf")
    images, targets = artifact.images, artifact.targets
    if artifact.views != "none":
        raise UserError(f"{artifact.path}: the set has views ({artifact.views}) whose targets --format hf does not "
                        "carry yet; use --format npz, which does")
    check_png_folder_out(artifact.path, images, out, "--format hf", _earlier_export, "an earlier hf export")
    pixels, clipped = to_pixels(artifact)
    image_dtype, target_dtype = str(images.dtype).removeprefix("torch."), str(targets.dtype).removeprefix("torch.")
    features = datasets.Features({
        "image": datasets.Image(), EXACT: datasets.Array3D(shape=tuple(images.shape[1:]), dtype=image_dtype),
        TARGETS: datasets.Sequence(datasets.Value(target_dtype))})
    info = datasets.DatasetInfo(description=json.dumps({INFO_KEY: facts(artifact)}), features=features,
                                dataset_name=artifact.method)
    with _quiet(datasets):
        table = datasets.Dataset.from_dict({"image": [_png(p) for p in pixels], EXACT: list(images.numpy()),
                                            TARGETS: list(targets.numpy())}, info=info, split="train")
        with artifacts.atomic_folder(out) as folder:
            table.save_to_disk(str(folder))
    if clipped > 0:
        log.info("export: %.2f %% of pixel values fell outside [0, 1] and were clipped in the PNG column "
                 "(column %s holds the exact values)", 100 * clipped, EXACT)
    log.info("exported %d images and targets %s as a Hugging Face dataset -> %s", len(images),
             list(targets.shape[1:]), out)
    return out


# ---- in ------------------------------------------------------------------------------------------

def _recorded(info: Any, found: Foreign, where: str) -> Foreign:
    """The facts an ssdd export put in the dataset info (nothing for other datasets)."""
    try:
        recorded = json.loads(getattr(info, "description", "") or "{}")
    except ValueError:
        return found  # a free-text description: not ours
    recorded = recorded.get(INFO_KEY) if isinstance(recorded, dict) else None
    if not isinstance(recorded, dict):
        return found
    space = recorded.get("image_space")
    if space not in (None, "reference", "normalized"):
        raise UserError(f"{where}: info records image_space {space!r}, expected reference or normalized")
    if space is not None:
        found.space, found.space_source = space, "recorded in the dataset info"
    found.mean, found.std, found.objective = recorded.get("mean"), recorded.get("std"), recorded.get("objective")
    lr = recorded.get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float))):
        raise UserError(f"{where}: info records lr {lr!r}, expected a number or null")
    found.lr = None if lr is None else float(lr)
    meta = recorded.get("meta")
    if isinstance(meta, dict):
        found.meta.update({k: meta[k] for k in ("model_spec", "class_names") if k in meta})
        if "method" in meta:
            found.meta["original_method"] = meta["method"]
    return found


def _column_arrays(ds: Any, columns: list[str]) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for batch in ds.select_columns(columns).with_format("numpy").iter(batch_size=hf_format.BATCH):
        for c in columns:
            parts[c].append(np.asarray(batch[c]))
    return {c: np.concatenate(p) for c, p in parts.items()}


def _pixels(ds: Any, column: str, where: str) -> torch.Tensor:
    """A column of images decoded at their own size as (N,C,H,W) pixel/255 (C = 1 when all are gray)."""
    datasets = hf_format.require_datasets()
    decoder, images = datasets.Image(), []
    for batch in ds.select_columns([column]).cast_column(column, datasets.Image(decode=False)).iter(
            batch_size=hf_format.BATCH):
        images += [hf_format._decode(decoder, v, where) for v in batch[column]]
    gray = all(im.mode in hf_format.GRAY_MODES for im in images)
    arrays = [np.asarray(im.convert("L" if gray else "RGB"), dtype=np.uint8) for im in images]
    if any(a.shape != arrays[0].shape for a in arrays):
        bad = next(a for a in arrays if a.shape != arrays[0].shape)
        raise UserError(f"{where}: an image is {bad.shape[1]}x{bad.shape[0]}, the first is "
                        f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; a set's images share one size")
    stacked = np.stack(arrays)
    stacked = stacked[:, None] if gray else stacked.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(stacked)).float() / 255


def read_hf_set(paths: list[Path]) -> Foreign:
    """``ssdd import --format hf``: a dataset's ``train`` split (or its only one) as a distilled set."""
    path = str(_single(paths, "hf", "save_to_disk folder, parquet file or folder of parquet files"))
    hf_format.require_datasets("import --format hf")
    located = hf_format.locate(path)
    name = hf_format.pick_split(located.splits, "train", path)
    where = f"{path} (split {name})"
    rows, features = hf_format.describe_split(located, name, where)
    if rows == 0:
        raise UserError(f"{where}: the split is empty")
    image = EXACT if EXACT in features else hf_format.find_image_column(features, None, where)
    label, names = (TARGETS, None) if TARGETS in features else hf_format.find_label_column(features, None, where)
    ds = hf_format.stream_split(located, name, [image] + ([label] if label else []), where)
    try:
        if image == EXACT:
            images, pixels = torch.from_numpy(_column_arrays(ds, [EXACT])[EXACT]), False
        else:
            images, pixels = _pixels(ds, image, where), True
        targets = torch.from_numpy(_column_arrays(ds, [label])[label]) if label else None
    except UserError:
        raise
    except Exception as err:  # ragged target lists, unreadable arrow data, ...
        raise UserError(f"{where}: unreadable ({one_line(err)[:200] or type(err).__name__})") from None
    found = Foreign(images, targets, [os.path.basename(path.rstrip("/")) or path], where, pixels=pixels)
    if names:
        found.meta["class_names"] = names
    return _recorded(getattr(ds, "info", None), found, where)
