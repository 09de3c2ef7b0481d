"""Load a teacher: any module mapping images to vectors.

Accepted: an ssdd encoder artifact; a state dict (safetensors, or a torch checkpoint read with
``weights_only=True``) for an architecture in our registry, including the torchvision /
solo-learn ResNet layout; or a TorchScript module. Nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssdd.artifacts import load_tensors
from ssdd.errors import UserError
from ssdd.models import Encoder, build, encoder_from_artifact
from ssdd.models.resnet import from_torchvision_keys


class FeatureExtractor(nn.Module):
    """Wrap an encoder so that calling it returns ``features(x)`` (the teacher's representation)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.features(x) if isinstance(self.encoder, Encoder) else self.encoder(x)


def is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] or name.endswith("/constants.pkl") for name in archive.namelist())


def _state_dict_from_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for refused globals, RuntimeError for corrupt zips, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a loadable weights-only torch checkpoint ({first[:200]})") from None
    for key in ("state_dict", "model", "backbone", "encoder"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a state dict of tensors (or one under 'state_dict'/'model')")
    return obj


def encoder_from_state_dict(state: dict[str, torch.Tensor], spec: dict, where: str) -> Encoder:
    """Build ``spec`` and load ``state`` into its backbone, mapping torchvision ResNet names."""
    model = build({**spec, "out_dim": 0})
    if spec["arch"] in ("resnet18", "resnet10") and any("layer1." in k for k in state):
        state = from_torchvision_keys(state, spec["arch"])
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches are not covered by strict=False
        lines = [ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln]
        raise UserError(f"{where}: weights do not fit {spec['arch']}: {(lines or [str(err)])[0][:200]}") from None
    if missing or unexpected:
        raise UserError(f"{where}: weights do not fit {spec['arch']}: missing {list(missing)[:6]}"
                        f"{'...' if len(missing) > 6 else ''}, unexpected {list(unexpected)[:6]}"
                        f"{'...' if len(unexpected) > 6 else ''}")
    return model


def load_teacher_module(path: str | os.PathLike, spec: dict) -> tuple[nn.Module, dict | None]:
    """The teacher as a module and the spec that rebuilds it: an :class:`Encoder` with its spec where
    possible (then it can also be evaluated), a TorchScript module with ``None`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--teacher {path}: file not found")
    if path.suffix == ".safetensors":
        tensors, meta = load_tensors(path)
        if meta.get("kind") == "encoder":
            encoder, meta = encoder_from_artifact(path)
            return encoder, meta["model_spec"]
        return encoder_from_state_dict(tensors, spec, str(path)), {**spec, "out_dim": 0}
    if is_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location="cpu"), None
        except Exception as err:
            raise UserError(f"{path}: not a loadable TorchScript module ({str(err).splitlines()[0][:200]})") from None
    return encoder_from_state_dict(_state_dict_from_checkpoint(path), spec, str(path)), {**spec, "out_dim": 0}


def as_teacher(module: nn.Module, channels: int, size: int, where: str, device: torch.device | str = "cpu") -> tuple[nn.Module, int]:
    """Freeze ``module`` as a feature extractor and detect (and check) its output dimension."""
    teacher = FeatureExtractor(module).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            out = teacher(torch.zeros(2, channels, size, size, device=device))
    except RuntimeError as err:
        raise UserError(f"{where}: teacher does not accept {channels}x{size}x{size} images ({str(err).splitlines()[0][:200]})") from None
    if out.ndim != 2:
        raise UserError(f"{where}: teacher must map images to vectors, got output shape {tuple(out.shape)}")
    return teacher, out.shape[1]


def load_teacher(path: str | os.PathLike, channels: int, size: int, device: torch.device | str = "cpu") -> tuple[nn.Module, int, dict]:
    """A frozen ssdd teacher artifact (as written by the teacher stage), its output dimension, metadata."""
    encoder, meta = encoder_from_artifact(path, device)
    teacher, dim = as_teacher(encoder, channels, size, str(path), device)
    return teacher, dim, meta
