"""What a command settles before any stage runs: the device, the precision, single-process commands."""

from __future__ import annotations

from typing import Any

import torch

from ssdd import distributed
from ssdd.config import Config
from ssdd.data.bundled import BUNDLED
from ssdd.errors import UserError
from ssdd.models import auto_precision, model_spec


def run_networks(cfg: Config) -> dict[str, dict[str, Any]]:
    """Build specs of the run's teacher and student, labelled, for ``auto``'s timing. Channels come from
    the source spec without reading data: the bundled sets are grayscale, everything else is taken as RGB
    (CIFAR, ImageNet, image folders); a brought teacher (``teacher.path``) is timed as ``teacher.model``,
    the architecture it loads as."""
    channels = 1 if cfg.data.source in BUNDLED else 3
    return auto_precision.labelled(model_spec(cfg.teacher.model, channels, cfg.data.size, 0),
                                   model_spec(cfg.model, channels, cfg.data.size, 0))


def run_precision(cfg: Config, device: torch.device | str) -> str:
    """``fp32`` or ``bf16`` for this run: ``cfg.precision``, with ``auto`` measured on the run's own networks."""
    return auto_precision.resolve(cfg.precision, device, run_networks(cfg) if cfg.precision == "auto" else None)


def resolve_device(name: str = "auto") -> torch.device:
    """``--device``: auto (the GPU when there is one), cpu, cuda or cuda:N, checked against what is here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: not supported (expected auto, cpu, cuda or cuda:N)")
    return device


def single_process(command: str) -> None:
    """Standalone commands run in one process: under torchrun every rank would write the same files."""
    if distributed.launched():
        raise UserError(f"{command} runs in one process; start it without torchrun (ssdd run and ssdd compare "
                        "use several)")
