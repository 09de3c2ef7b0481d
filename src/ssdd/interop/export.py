"""ssdd's distilled sets written for other tools: ``imagefolder`` (PNGs in pixel space + ``targets.npz``),
``npz`` (exact float arrays and the metadata) and ``hf`` (a Hugging Face dataset, :mod:`ssdd.interop.hf`).
``ssdd import`` reads all three back."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ssdd import artifacts, distilled_set
from ssdd.distilled_set import DistilledArtifact
from ssdd.errors import UserError
from ssdd.interop.pixels import check_png_folder_out, to_pixels
from ssdd.interop.readers import TARGETS_FILE, _listing

log = logging.getLogger("ssdd")

FORMATS_OUT = ("imagefolder", "npz", "hf")


def _replaceable(folder: Path) -> bool:
    """An existing --out folder may be replaced only when empty or an earlier export (images + targets.npz)."""
    dirs, images = _listing(folder)
    others = [p for p in folder.iterdir() if p.is_file() and p.name != TARGETS_FILE and p not in images]
    return not dirs and not others and (not images or (folder / TARGETS_FILE).is_file())


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:  # a file object: np.savez would append ".npz" to a name
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())


def _facts(artifact: DistilledArtifact) -> dict[str, np.ndarray]:
    """The arrays both export formats carry beside the images (what import reads back): the metadata is
    the set's as recorded, less its fingerprint."""
    facts = {"targets": artifact.targets.float().numpy(), "objective": np.array(str(artifact.objective)),
             "image_space": np.array(str(artifact.image_space)),
             "meta": np.array(json.dumps({k: v for k, v in artifact.recorded.items() if k != "fingerprint"}))}
    for key in ("mean", "std"):
        if getattr(artifact, key) is not None:
            facts[key] = np.asarray(getattr(artifact, key), dtype=np.float64).reshape(-1)
    if artifact.lr is not None:
        facts["lr"] = np.array(float(artifact.lr))
    if artifact.views != "none":  # the targets of views 1..K-1 (rebuilt when the set stores a network)
        facts["views"] = np.array(str(artifact.views))
        facts["view_targets"] = artifact.all_view_targets().float().numpy()
    return facts


def export_set(distilled: str | os.PathLike, fmt: str, out: str | os.PathLike) -> Path:
    """Write a distilled set for other tools: ``imagefolder`` (PNGs in [0, 1] pixel space quantised to
    uint8, plus ``targets.npz``: targets, objective, lr and the set's image space), ``npz`` (the
    exact float images and targets, lr and metadata) or ``hf`` (a ``save_to_disk`` folder: PNG and exact
    images, targets; lr and metadata in its info). Returns what was written."""
    if fmt not in FORMATS_OUT:
        raise UserError(f"export: unknown --format {fmt!r} (expected {', '.join(FORMATS_OUT)})")
    artifact = distilled_set.load(distilled)
    images = artifact.images
    out = Path(out)
    if fmt == "hf":
        from ssdd.interop.hf import export_hf  # needs the optional datasets package

        return export_hf(artifact, out)
    if fmt == "npz":
        if out.suffix != ".npz":
            out = out / f"{Path(distilled).stem}.npz"
        if out.is_dir():
            raise UserError(f"--out {out}: is a folder")
        with artifacts.atomic_path(out) as tmp:
            _save_npz(tmp, {"images": images.numpy(), **_facts(artifact)})
        log.info("exported %d images and targets %s -> %s", len(images), list(artifact.targets.shape[1:]), out)
        return out
    check_png_folder_out(distilled, images, out, "imagefolder", _replaceable, "an earlier export")
    pixels, clipped = to_pixels(artifact)
    width = max(5, len(str(len(pixels) - 1)))
    names = [f"{i:0{width}d}.png" for i in range(len(pixels))]
    with artifacts.atomic_folder(out) as folder:
        for name, px in zip(names, pixels):
            with open(folder / name, "wb") as fh:
                Image.fromarray(px[:, :, 0] if px.shape[2] == 1 else px).save(fh, format="PNG")
                fh.flush()
                os.fsync(fh.fileno())
        _save_npz(folder / TARGETS_FILE, {"files": np.array(names), **_facts(artifact)})
    if clipped > 0:
        log.info("export: %.2f %% of pixel values fell outside [0, 1] and were clipped in the PNGs "
                 "(use --format npz for the exact values)", 100 * clipped)
    log.info("exported %d PNGs and %s -> %s", len(pixels), TARGETS_FILE, out)
    return out
