"""Compute precision: fp32 everywhere, or bf16 autocast where the hardware runs bf16 natively.

``auto`` picks bf16 only on CUDA GPUs with bf16 support and on CPUs with AMX or AVX-512-bf16:
on an AVX2-only CPU bf16 is emulated and about 6x *slower* than fp32. The choice applies to
network forwards and backwards (teacher, pool models, students); losses, kernels and ridge
solves always run in fp32/fp64 (they cast their inputs and switch autocast off).

A stage runs inside :func:`use` (the pipeline does this per stage); the training loops call
:func:`autocast`, which reads that setting. Library callers get fp32 unless they opt in.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import platform
from collections.abc import Iterator

import torch

from ssdd.errors import UserError

CHOICES = ("auto", "fp32", "bf16")
_current: contextvars.ContextVar[str] = contextvars.ContextVar("ssdd_precision", default="fp32")


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    """A human-readable CPU name, for printing beside every timing."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively (so bf16 autocast is faster, not slower)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())
    return False


def describe(device: torch.device | str) -> str:
    """One line: the device, and whether it has native bf16 (printed with timings and logs)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_model()
    return f"{device.type}: {name} (native bf16: {'yes' if native_bf16(device) else 'no'})"


def resolve(choice: str, device: torch.device | str) -> str:
    """``auto`` -> ``bf16`` on hardware with native bf16, else ``fp32``; explicit choices are kept."""
    if choice not in CHOICES:
        raise UserError(f"precision: expected one of {', '.join(CHOICES)}, got '{choice}'")
    if choice == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return choice


def current() -> str:
    """The precision of the stage being run (``fp32`` outside :func:`use`)."""
    return _current.get()


@contextlib.contextmanager
def use(precision: str) -> Iterator[None]:
    """Run the enclosed work at ``precision`` (``fp32`` or ``bf16``, already resolved)."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"use() takes a resolved precision (fp32 or bf16), got {precision!r}")
    token = _current.set(precision)
    try:
        yield
    finally:
        _current.reset(token)


def autocast(device: torch.device | str, precision: str | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when the precision (default: :func:`current`) is bf16; else a no-op."""
    precision = precision or current()
    device_type = torch.device(device).type
    if precision == "bf16" and device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_precision(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast off: for losses, kernels and solves inside a bf16 region (cast inputs with ``.float()``)."""
    return torch.autocast(torch.device(device).type, enabled=False)
