"""The distilled-set artifact: one owner for its schema, its file and its checks.

A distilled set is a safetensors file of two float tensors, ``images`` (m, C, H, W) and ``targets``
(m, d), and string metadata. :class:`DistilledArtifact` is that file as one value; :func:`save` and
:func:`load` are the only code that writes or reads one (the pipeline's distill stage, ``ssdd
import``, pre-training, KD, the report, ``ssdd export`` and :func:`load_distilled` all go through
them), and :meth:`DistilledArtifact.validate` says in one line what is wrong with a file.

Metadata, schema version 2 (``schema_version``):

- ``method``: the method that made the set (an imported set: the name given, else the file's stem);
- ``objective``: how pre-training uses it: ``mse`` (regress onto the targets), ``cross_entropy``
  (targets are class probabilities) or ``barlow_twins`` (self-supervised on the images; targets (m, 0));
- ``lr``: a learned pre-training learning rate, or null (then ``pretrain.lr``);
- ``image_space``: ``normalized`` ((pixel/255 - mean) / std) or ``reference`` (pixel/255, not
  normalised, as the KRR-ST reference code keeps them), explained in ``image_space_note``;
- ``mean``, ``std``: per-channel statistics (one value, or one per channel), required for a normalised set;
- ``model_spec`` (optional): the spec pre-training builds its student from;
- ``fingerprint`` (optional): the config fingerprint the pipeline reuses the set by;
- ``views`` (optional, only when not ``none``): the view family (:mod:`ssdd.views`); the set then also
  holds the targets of the K-1 further views of every image, either stored (tensor ``view_targets``
  (m, K-1, d)) or as an approximation network (tensors ``view_net.*``, :mod:`ssdd.views.approx`), and
  pre-training regresses all m·K (view, target) pairs (:meth:`DistilledArtifact.pairs`);
- ``kind`` (``distilled_set``) and ``ssdd_version``; every other key is free metadata (seed, init_index,
  losses, heldout_check, imported_from, ...).

Version 1 is every file written before the version was recorded: the same keys, where ``method``,
``objective``, ``lr`` and ``image_space`` may be missing (read as the file's stem, ``mse``, null and
``reference``). Version 2 records them always.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ssdd import artifacts
from ssdd.errors import UserError
from ssdd.views import approx as view_approx
from ssdd.views import transforms as views

SCHEMA_VERSION = 2
KIND = "distilled_set"
OBJECTIVES = ("mse", "cross_entropy", "barlow_twins")
SPACES = ("normalized", "reference")
SPACE_NOTES = {"normalized": "normalised: (pixel/255 - mean) / std",
               "reference": "reference: raw pixel/255 in [0,1], not normalised (as the reference code)"}
# Keys the artifact's fields hold, and keys save() writes around them; the rest is free metadata.
FIELDS = ("method", "objective", "lr", "image_space", "mean", "std", "model_spec", "fingerprint", "views")
ENVELOPE = ("kind", "schema_version", "ssdd_version", "image_space_note")
REQUIRED = ("method", "objective", "lr", "image_space")  # recorded by every version-2 file


def channel_values(values: Sequence[float] | None, channels: int) -> list[float] | None:
    """Per-channel statistics as ``channels`` floats (one value is repeated); ValueError when there
    are neither one nor ``channels`` finite values."""
    if values is None:
        return None
    out = [float(v) for v in values]
    if len(out) == 1:
        out = out * channels
    if len(out) != channels or not all(math.isfinite(v) for v in out):
        raise ValueError(f"expected {channels} finite values (one per channel) or one, got {len(out)}")
    return out


def to_unit(images: torch.Tensor, image_space: str, mean: Sequence[float] | None,
            std: Sequence[float] | None) -> torch.Tensor:
    """Images in pixel/255 space (not clipped): a normalised set is mapped back with its statistics,
    a reference-space set is already there."""
    x = images.float()
    if image_space != "normalized":
        return x
    c = x.shape[1]
    if mean is None or std is None:
        raise UserError("the set's images are normalised but its metadata records no mean/std")
    mean_, std_ = channel_values(mean, c), channel_values(std, c)
    return x * torch.tensor(std_).view(1, -1, 1, 1) + torch.tensor(mean_).view(1, -1, 1, 1)


@dataclass(eq=False)  # tensors have no single truth value: compare them with torch.equal
class DistilledArtifact:
    """One distilled set: its tensors, the fields of its schema and its free metadata (``meta``).

    ``path``: where it was loaded from or saved to; ``recorded``: the metadata dict it was made from
    (after :func:`load`, exactly as the file holds it); ``schema_version``: the file's (:func:`save`
    always writes :data:`SCHEMA_VERSION`)."""

    images: torch.Tensor
    targets: torch.Tensor
    method: str
    objective: str = "mse"
    lr: float | None = None
    image_space: str = "reference"
    mean: list[float] | None = None
    std: list[float] | None = None
    model_spec: dict[str, Any] | None = None
    fingerprint: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    views: str = views.NONE
    view_targets: torch.Tensor | None = None  # (m, K-1, d): the targets of views 1..K-1, when stored
    view_net: dict[str, torch.Tensor] | None = None  # or the approximation network that gives them
    schema_version: int = SCHEMA_VERSION
    path: Path | None = None
    recorded: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_metadata(cls, images: torch.Tensor, targets: torch.Tensor, metadata: dict[str, Any],
                      path: str | os.PathLike) -> "DistilledArtifact":
        """The artifact of a file's (or a writer's) metadata dict: its fields where recorded, a
        version-1 file's defaults where not (``method``: the file's stem)."""
        version = metadata.get("schema_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise UserError(f"{path}: metadata 'schema_version' must be a positive integer, got {version!r}")
        if version > SCHEMA_VERSION:
            raise UserError(f"{path}: distilled set of schema version {version}, written by a newer ssdd "
                            f"(this one reads versions 1 to {SCHEMA_VERSION}); upgrade ssdd")
        if version >= 2:
            missing = [k for k in REQUIRED if k not in metadata]
            if missing:
                raise UserError(f"{path}: distilled set (schema {version}) lacks metadata {missing}; "
                                f"expected {', '.join(REQUIRED)}")
        return cls(images, targets, method=str(metadata.get("method", Path(path).stem)),
                   objective=metadata.get("objective", "mse"), lr=metadata.get("lr"),
                   image_space=metadata.get("image_space", "reference"), mean=metadata.get("mean"),
                   std=metadata.get("std"), model_spec=metadata.get("model_spec"),
                   fingerprint=metadata.get("fingerprint"), views=metadata.get("views", views.NONE),
                   meta={k: v for k, v in metadata.items() if k not in FIELDS and k not in ENVELOPE},
                   schema_version=version, path=Path(path), recorded=dict(metadata))

    def metadata(self) -> dict[str, Any]:
        """The metadata :func:`save` writes (``ssdd_version`` is added by the writer): the optional
        ``model_spec`` and ``fingerprint`` only when set."""
        out: dict[str, Any] = {"kind": KIND, "schema_version": SCHEMA_VERSION, "method": self.method,
                               "objective": self.objective, "lr": self.lr, "image_space": self.image_space,
                               "image_space_note": SPACE_NOTES.get(self.image_space, "")}
        for key in ("mean", "std", "model_spec", "fingerprint"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.views != views.NONE:
            out["views"] = self.views
        clash = sorted(set(self.meta) & set(out))
        if clash:
            raise ValueError(f"distilled set: free metadata {clash} would overwrite the set's own fields")
        return {**out, **self.meta}

    def validate(self, values: bool = True) -> "DistilledArtifact":
        """Raise a one-line UserError naming the file and what was expected; ``values=False`` skips the
        scan for NaN/inf (writers check their values with their own advice). Returns the artifact."""
        where = self.path or f"distilled set {self.method!r}"
        images, targets = self.images, self.targets
        if images.ndim != 4 or targets.ndim != 2 or len(images) != len(targets):
            raise UserError(f"{where}: expected images (m,C,H,W) and targets (m,d), got "
                            f"{tuple(images.shape)} and {tuple(targets.shape)}")
        if not (images.is_floating_point() and targets.is_floating_point()):
            raise UserError(f"{where}: expected float images and targets, got {images.dtype} and {targets.dtype}")
        if values and not (torch.isfinite(images).all() and torch.isfinite(targets).all()):
            raise UserError(f"{where}: distilled set holds NaN or inf values")
        if self.objective not in OBJECTIVES:
            raise UserError(f"{where}: metadata 'objective' must be one of {', '.join(OBJECTIVES)}, "
                            f"got {self.objective!r}")
        if self.objective != "barlow_twins" and targets.shape[1] == 0:
            raise UserError(f"{where}: objective {self.objective} needs targets (m,d) with d >= 1, got "
                            f"{tuple(targets.shape)} (a set without targets is objective barlow_twins)")
        if self.image_space not in SPACES:
            raise UserError(f"{where}: metadata 'image_space' must be normalized or reference, got "
                            f"{self.image_space!r}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is None:
                if self.image_space == "normalized":
                    raise UserError(f"{where}: the images are normalised but the metadata records no {key} "
                                    f"(expected one value per channel, {images.shape[1]})")
                continue
            try:
                stats = channel_values(value, images.shape[1]) if isinstance(value, (list, tuple)) else None
            except (TypeError, ValueError):
                stats = None
            if stats is None:
                raise UserError(f"{where}: metadata '{key}' must be a list of {images.shape[1]} finite numbers "
                                f"(one per channel) or one, got {value!r}")
            if key == "std" and min(stats) <= 0:
                raise UserError(f"{where}: metadata 'std' must be positive, got {value!r}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not math.isfinite(self.lr)):
            raise UserError(f"{where}: metadata 'lr' must be a finite number or null, got {self.lr!r}")
        if self.model_spec is not None and not isinstance(self.model_spec, dict):
            raise UserError(f"{where}: metadata 'model_spec' must be a model spec (a JSON object), "
                            f"got {type(self.model_spec).__name__}")
        if not isinstance(self.method, str) or not self.method:
            raise UserError(f"{where}: metadata 'method' must be a non-empty string, got {self.method!r}")
        self._validate_views(where)
        return self

    def _validate_views(self, where: Any) -> None:
        if self.views not in views.FAMILIES:
            raise UserError(f"{where}: metadata 'views' must be one of {', '.join(views.FAMILIES)}, got {self.views!r}")
        if self.views == views.NONE:
            if self.view_targets is not None or self.view_net is not None:
                raise UserError(f"{where}: the set holds view targets but its metadata 'views' is none")
            return
        if self.objective != "mse":
            raise UserError(f"{where}: views need MSE targets (objective mse), got objective {self.objective}")
        m, d, v = len(self.targets), self.targets.shape[1], views.count(self.views) - 1
        if (self.view_targets is None) == (self.view_net is None):
            raise UserError(f"{where}: views {self.views!r} need exactly one of the tensors view_targets or "
                            f"view_net.* (the approximation network)")
        if self.view_targets is not None and tuple(self.view_targets.shape) != (m, v, d):
            raise UserError(f"{where}: expected view_targets of shape {(m, v, d)} for views {self.views!r}, "
                            f"got {tuple(self.view_targets.shape)}")
        if self.view_net is not None:
            w1 = self.view_net["w1"]
            if w1.ndim != 3 or w1.shape[0] != v or w1.shape[2] != d:
                raise UserError(f"{where}: view_net.w1 must be (K-1={v}, hidden, d={d}), got {tuple(w1.shape)}")

    def all_view_targets(self) -> torch.Tensor | None:
        """The targets (m, K-1, d) of views 1..K-1: stored, or rebuilt by the approximation network."""
        if self.view_net is not None:
            with torch.no_grad():
                return view_approx.predict(self.view_net, self.targets.float())
        return self.view_targets

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What pre-training regresses: every view of every image with its target, (m·K) rows, view-major
        (without views: the images and targets themselves)."""
        if self.views == views.NONE:
            return self.images, self.targets
        return views.expand(self.images, self.views), views.expand_targets(self.targets, self.all_view_targets())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors :func:`save` writes."""
        out = {"images": self.images.float(), "targets": self.targets.float()}
        if self.view_targets is not None:
            out["view_targets"] = self.view_targets.float()
        if self.view_net is not None:
            out.update(view_approx.to_tensors(self.view_net))
        return out

    def to_unit(self) -> torch.Tensor:
        """The images in pixel/255 space, not clipped."""
        return to_unit(self.images, self.image_space, self.mean, self.std)

    def pixels(self) -> torch.Tensor:
        """The images in [0, 1] pixel space (un-normalised, clipped)."""
        return self.to_unit().clamp(0, 1)


def save(path: str | os.PathLike, artifact: DistilledArtifact) -> None:
    """Write the set atomically at the current schema version (its values are the writer's to check)."""
    artifact.path = Path(path)
    artifact.validate(values=False)
    artifacts.save_tensors(path, artifact.tensors(), artifact.metadata())


def load(path: str | os.PathLike) -> DistilledArtifact:
    """A distilled set from its file, checked (:meth:`DistilledArtifact.validate`)."""
    tensors, metadata = artifacts.load_tensors(path, required=("images", "targets"))
    artifact = DistilledArtifact.from_metadata(tensors["images"], tensors["targets"], metadata, path)
    artifact.view_targets, artifact.view_net = tensors.get("view_targets"), view_approx.from_tensors(tensors)
    return artifact.validate()


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The set's metadata as recorded, from the file's header alone (no tensors read)."""
    return artifacts.read_meta(path)


def method_of(path: str | os.PathLike) -> str:
    """The set's ``method`` from its header (a version-1 file without one: its stem)."""
    return str(read_meta(path).get("method", Path(path).stem))


def image_shape(path: str | os.PathLike) -> list[int] | None:
    """The shape of the set's ``images``, from its header alone."""
    return artifacts.tensor_shapes(path).get("images")


def stored_numbers(path: str | os.PathLike) -> int:
    """How many numbers the set stores: its images, its targets, its view targets or approximation network
    when it has views, and its learned lr when it has one (from the file's header alone). What a set costs,
    to compare sets of equal budget."""
    count = sum(math.prod(shape) for shape in artifacts.tensor_shapes(path).values())
    return count + (read_meta(path).get("lr") is not None)


# ---- tensors and one metadata dict (how the pipeline, tests and scripts hand a set over) ------

def save_arrays(path: str | os.PathLike, images: torch.Tensor, targets: torch.Tensor, metadata: dict[str, Any],
                view_targets: torch.Tensor | None = None, view_net: dict[str, torch.Tensor] | None = None) -> None:
    """Write a set from its tensors and one metadata dict: the schema's fields are taken from the dict
    (defaults where absent; ``method``: the file's stem), the rest is free metadata. A set with views
    (metadata ``views``) passes its ``view_targets`` or its approximation network ``view_net``."""
    extra = {k: v for k, v in metadata.items() if k not in ENVELOPE}
    artifact = DistilledArtifact.from_metadata(images, targets, extra, path)
    artifact.view_targets, artifact.view_net = view_targets, view_net
    save(path, artifact)


def load_arrays(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``(images, targets, metadata as recorded)`` of a checked set."""
    artifact = load(path)
    return artifact.images, artifact.targets, artifact.recorded


# ---- a Dataset for other training code -------------------------------------------------------

class DistilledDataset(torch.utils.data.Dataset):
    """A distilled set as ``(image, target)`` float tensors, images in the set's own ``image_space``
    (``"normalized"``: (pixel/255 - mean)/std; ``"reference"``: pixel/255), so a model trains on
    exactly what ssdd's pre-training sees. ``objective`` says how to use the targets: ``mse``
    (regress onto them), ``cross_entropy`` (class probabilities) or ``barlow_twins`` (no targets)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.artifact = load(self.path)
        self.images, self.targets, self.meta = self.artifact.images, self.artifact.targets, self.artifact.recorded
        self.image_space: str = self.artifact.image_space
        c = self.images.shape[1]
        self.mean: list[float] = channel_values(self.artifact.mean, c) or [0.0] * c
        self.std: list[float] = channel_values(self.artifact.std, c) or [1.0] * c
        self.objective: str = self.artifact.objective
        self.lr: float | None = float(self.artifact.lr) if self.artifact.lr is not None else None
        self.method: str = self.artifact.method

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.targets[index]

    def pixels(self) -> torch.Tensor:
        """All images in [0, 1] pixel space (un-normalised, clipped), e.g. to apply your own normalisation."""
        return self.artifact.pixels()

    def __repr__(self) -> str:
        return (f"DistilledDataset({str(self.path)!r}: {len(self)} images {list(self.images.shape[1:])}, targets "
                f"{list(self.targets.shape[1:])}, objective={self.objective}, image_space={self.image_space}, "
                f"lr={self.lr})")


def load_distilled(path: str | os.PathLike) -> DistilledDataset:
    """A distilled-set artifact (ssdd's own or imported) as a ``torch.utils.data.Dataset``."""
    return DistilledDataset(path)
