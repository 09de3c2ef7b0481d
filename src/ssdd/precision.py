"""Compute precision: fp32 everywhere, or bf16 autocast; what the device can do natively.

``auto`` picks bf16 only where bf16 is *measured* faster for the run's own networks
(:mod:`ssdd.models.auto_precision`, which times them). Native bf16
(CUDA compute capability 8.0 or newer; CPUs with AMX or AVX-512-bf16) is necessary but not enough:
on an AVX2-only CPU bf16 is emulated and about 6x *slower* than fp32 (never timed, always fp32),
an Intel Xeon with AVX-512-bf16 but no AMX was measured no faster than fp32, and an AMD EPYC (Zen 4)
runs a forward+backward of the demo's ConvNet 1.5-1.6x faster in bf16 but quality-small's student
(instance norm) 2x slower. So the first ``auto`` run on a machine
times forward+backward of the teacher and student networks in both precisions (about 2 s) and
caches the decision in ``$SSDD_CACHE_DIR/precision.json`` (default ``~/.cache/ssdd``), keyed by
device model, torch version and network specs: the choice enters artifact fingerprints, so it must
not flip between runs on one machine. ``SSDD_AUTO_PRECISION=fp32|bf16`` overrides ``auto``.

The choice applies to network forwards and backwards (teacher, pool models, students); losses,
kernels and ridge solves always run in fp32/fp64 (they cast their inputs and switch autocast off),
and :func:`use` switches TF32 off on CUDA so that fp32, in fp32 runs and in those parts of bf16
runs, is IEEE fp32.

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


def device_name(device: torch.device | str) -> str:
    """The model name of ``device`` (GPU name or CPU model): what a calibration is valid for."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return cpu_model()


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively. Needed before bf16 can be faster, not sufficient.

    CUDA: compute capability 8.0 (Ampere) or newer of *this* device; ``is_bf16_supported()`` also
    counts emulated bf16 on older GPUs and asks the current device instead."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and tuple(torch.cuda.get_device_capability(device)) >= (8, 0)
    if device.type == "cpu":
        return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())
    return False


def describe(device: torch.device | str) -> str:
    """One line: the device, and whether it has native bf16 (printed with timings and logs)."""
    device = torch.device(device)
    return f"{device.type}: {device_name(device)} (native bf16: {'yes' if native_bf16(device) else 'no'})"


# ---- using a precision ----------------------------------------------------------------------

def current() -> str:
    """The precision of the stage being run (``fp32`` outside :func:`use`)."""
    return _current.get()


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """TF32 off for CUDA matmuls and convolutions (cuDNN allows TF32 by default), restored on exit:
    fp32 must mean IEEE fp32 (23-bit mantissa), not TF32's 10 bits. No effect on CPU kernels.

    Through torch's legacy switches, which torch.compile's convolution code still reads, and which
    cannot be read once torch's newer per-backend ``fp32_precision`` API has set something else:
    when the caller has used that API, it is used here instead."""
    try:
        saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
                 torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        backends = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)
        before = [b.fp32_precision for b in backends]
        for b in backends:
            b.fp32_precision = "ieee"
        try:
            yield
        finally:
            for b, value in zip(backends, before):
                b.fp32_precision = value
        return
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cuda.matmul.allow_tf32 = saved[1]
        torch.backends.cudnn.allow_tf32 = saved[2]


@contextlib.contextmanager
def use(precision: str) -> Iterator[None]:
    """Run the enclosed work at ``precision`` (``fp32`` or ``bf16``, already resolved).

    Both switch TF32 off: fp32 runs, and the fp32 parts of bf16 runs (losses, kernels, ridge
    solves), are then IEEE fp32 on CUDA as on CPU."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"use() takes a resolved precision (fp32 or bf16), got {precision!r}")
    token = _current.set(precision)
    try:
        with strict_fp32():
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
