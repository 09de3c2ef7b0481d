"""Compute precision: fp32 everywhere, or bf16 autocast where it is measured to be faster.

``auto`` picks bf16 only where bf16 is *measured* faster for the run's own networks. Native bf16
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
import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ssdd import distributed
from ssdd.errors import UserError

CHOICES = ("auto", "fp32", "bf16")
ENV_OVERRIDE = "SSDD_AUTO_PRECISION"
ENV_CACHE_DIR = "SSDD_CACHE_DIR"
MIN_SPEEDUP = 1.05  # bf16 must beat fp32 by 5 % on every network: below that, timing noise decides
CALIBRATION_BUDGET_S = 2.0
CACHE_VERSION = 1

log = logging.getLogger("ssdd")
_current: contextvars.ContextVar[str] = contextvars.ContextVar("ssdd_precision", default="fp32")
_decided: dict[tuple[str, str], str] = {}  # (cache file, key) -> choice: one process measures and reads once
_logged: set[tuple] = set()


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


# ---- auto: measured choice ------------------------------------------------------------------

def cache_path() -> Path:
    """``$SSDD_CACHE_DIR/precision.json``, else ``~/.cache/ssdd/precision.json``."""
    root = os.environ.get(ENV_CACHE_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "ssdd")
    return Path(root) / "precision.json"


def calibration_networks(cfg: Any) -> dict[str, dict[str, Any]]:
    """Build specs of the run's own networks (teacher ``cfg.teacher.model``, student ``cfg.model``)
    at the configured image size, labelled for the log; one entry when both are the same network.

    Channels come from the source spec without reading data: the bundled sets are grayscale,
    everything else is taken as RGB (CIFAR, ImageNet, image folders). With ``teacher.path`` the
    teacher brought is timed as ``teacher.model``, the architecture the pipeline loads it as."""
    from ssdd.data.bundled import BUNDLED
    from ssdd.models import model_spec

    channels = 1 if cfg.data.source in BUNDLED else 3
    specs = {"teacher": model_spec(cfg.teacher.model, channels, cfg.data.size, 0),
             "student": model_spec(cfg.model, channels, cfg.data.size, 0)}
    if specs["teacher"] == specs["student"]:
        return {specs["teacher"]["arch"]: specs["teacher"]}
    if specs["teacher"]["arch"] == specs["student"]["arch"]:
        return {f"{spec['arch']} ({role})": spec for role, spec in specs.items()}
    return {spec["arch"]: spec for spec in specs.values()}


def calibration_batch(device: torch.device | str, image_size: int) -> int:
    """A representative batch: 64 images of 32 px on a CPU (fine-tuning's batch; pre-training and
    distillation use more), 256 on a GPU, where 64 small images are launch-bound and would hide
    what bf16 gains at the batches the stages run. Fewer for larger images, at least 8."""
    base = 256 if torch.device(device).type == "cuda" else 64
    return max(8, base * 32 * 32 // max(1, image_size * image_size))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_passes(networks: Mapping[str, Mapping[str, Any]], device: torch.device | str,
                budget_s: float = CALIBRATION_BUDGET_S, batch: int | None = None, min_reps: int = 3,
                max_reps: int = 25) -> dict[str, dict[str, list[float]]]:
    """Seconds of one forward+backward per network, precision and round: ``{label: {"fp32": [...],
    "bf16": [...]}}``, the two lists paired by round.

    Each network is built (train mode, channels-last like the stages' models), warmed up once in
    each precision, then timed in rounds that alternate which precision goes first until
    ``budget_s`` (counted from the start, builds and warm-ups included) is spent, with at least
    ``min_reps`` rounds. fp32 runs with TF32 off, as :func:`use` runs it. The global RNG is left as
    it was: runs seed themselves, and a calibration must not change what they compute."""
    from ssdd.models import build

    device = torch.device(device)
    start = time.perf_counter()
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), _strict_fp32():
        torch.manual_seed(0)
        nets = {}
        for label, spec in networks.items():
            model = build(dict(spec)).to(device).train()
            size = int(spec["image_size"])
            x = torch.randn(batch or calibration_batch(device, size), int(spec["in_channels"]), size, size,
                            device=device).contiguous(memory_format=torch.channels_last)
            nets[label] = (model, x)

        def one_pass(model: torch.nn.Module, x: torch.Tensor, precision: str) -> float:
            model.zero_grad(set_to_none=True)
            _sync(device)
            t = time.perf_counter()
            with autocast(device, precision):
                out = model(x)
            out.float().square().mean().backward()
            _sync(device)
            return time.perf_counter() - t

        for model, x in nets.values():
            one_pass(model, x, "fp32")
            one_pass(model, x, "bf16")
        times: dict[str, dict[str, list[float]]] = {label: {"fp32": [], "bf16": []} for label in nets}
        for r in range(max_reps):
            if r >= min_reps and time.perf_counter() - start > budget_s:
                break
            for label, (model, x) in nets.items():  # a pair back to back
                for precision in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
                    times[label][precision].append(one_pass(model, x, precision))
    return times


def speed_ratio(times: Mapping[str, list[float]]) -> float:
    """fp32 time / bf16 time (>1: bf16 faster), of each precision's fastest round: other processes
    only ever add time to a pass, and alternating rounds give both precisions the same chances of a
    quiet moment. (On a 2-core machine oversubscribed by other jobs no statistic of a few rounds was
    stable, minima or medians: single passes took up to 20x their unloaded time.)"""
    return min(times["fp32"]) / min(times["bf16"])


def measure_speedups(networks: Mapping[str, Mapping[str, Any]], device: torch.device | str,
                     budget_s: float = CALIBRATION_BUDGET_S) -> dict[str, float]:
    """The calibration: fp32 time / bf16 time of one forward+backward per network (:func:`time_passes`).
    Warns when the passes varied a lot: the machine was busy, and the cached choice may be wrong."""
    times = time_passes(networks, device, budget_s)
    noisy = [label for label, t in times.items() if any(statistics.median(v) > 1.5 * min(v) for v in t.values())]
    if noisy:
        log.warning("precision: timings of %s varied by more than 1.5x (other load on this machine?); "
                    "to decide again later delete %s, or set %s=fp32|bf16", ", ".join(noisy), cache_path(),
                    ENV_OVERRIDE)
    return {label: speed_ratio(t) for label, t in times.items()}


def _cache_key(entry: Mapping[str, Any]) -> str:
    text = json.dumps({k: entry[k] for k in ("device", "torch", "networks", "batch")}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_cache(path: Path, warn: bool = True) -> dict[str, Any]:
    """The cache's entries; a missing, unreadable or foreign file counts as empty (it is only a cache)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        if warn:
            log.warning("precision: ignoring the calibration cache %s (%s); measuring again", path, err)
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _write_cache(path: Path, key: str, entry: dict[str, Any]) -> bool:
    """Add ``entry`` atomically (temp file + rename: a reader never sees half a file). False when
    the folder is not writable: then the next run measures again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_cache(path, warn=False)
        entries[key] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".precision.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:
        log.warning("precision: cannot write the calibration cache %s (%s)", path, err)
        return False
    return True


def _env_override() -> str | None:
    value = os.environ.get(ENV_OVERRIDE, "").strip()
    if not value:
        return None
    if value not in ("fp32", "bf16"):
        raise UserError(f"{ENV_OVERRIDE}={value}: expected fp32 or bf16")
    return value


def _ratios_text(ratios: Mapping[str, float]) -> str:
    """``bf16 1.92x faster on convnet, 1.71x on resnet18`` (or ``... 0.80x as fast ...``)."""
    if not ratios:
        return "no timings"
    word = "faster" if all(r >= 1 for r in ratios.values()) else "as fast"
    return "bf16 " + ", ".join(f"{r:.2f}x{' ' + word if i == 0 else ''} on {label}"
                               for i, (label, r) in enumerate(ratios.items()))


def _home_short(path: Path) -> str:
    home = os.path.expanduser("~")
    return "~" + str(path)[len(home):] if home not in ("", "/") and str(path).startswith(home + os.sep) else str(path)


DEFAULT_NETWORK: dict[str, Any] = {"arch": "convnet", "in_channels": 1, "image_size": 32, "out_dim": 0,
                                   "widths": [32, 64, 128], "pool": "gap"}  # the demo's teacher and student


def _once(key: tuple, message: str, *args: Any) -> None:
    """Log a decision once per process (the standalone commands resolve once per seed and target)."""
    if key not in _logged:
        _logged.add(key)
        log.info(message, *args)


def auto_choice(device: torch.device | str, networks: Mapping[str, Mapping[str, Any]],
                measure: Callable[..., dict[str, float]] | None = None) -> str:
    """``auto`` for these networks on ``device``: the cached decision, else a measured one (cached).

    Hardware without native bf16 is fp32 with no timing. ``measure`` defaults to
    :func:`measure_speedups` (tests inject a fake)."""
    device = torch.device(device)
    name = device_name(device)
    if not native_bf16(device):
        _once(("native", name), "precision auto -> fp32 (%s has no native bf16; not timed)", name)
        return "fp32"
    entry: dict[str, Any] = json.loads(json.dumps({  # as the file will hold it (tuples become lists)
        "device": name, "torch": torch.__version__, "networks": {k: dict(v) for k, v in networks.items()},
        "batch": {k: calibration_batch(device, int(v["image_size"])) for k, v in networks.items()}}))
    path = cache_path()
    key = _cache_key(entry)
    if (str(path), key) in _decided:
        return _decided[(str(path), key)]
    cached = _read_cache(path).get(key)
    if (isinstance(cached, dict) and cached.get("choice") in ("fp32", "bf16")
            and all(cached.get(k) == entry[k] for k in ("device", "torch", "networks", "batch"))):
        choice = cached["choice"]
        log.info("precision auto -> %s (measured earlier on %s: %s; cached in %s)", choice, name,
                 _ratios_text(cached.get("ratios", {})), _home_short(path))
    else:
        ratios = (measure or measure_speedups)(entry["networks"], device)
        choice = "bf16" if ratios and all(r > MIN_SPEEDUP for r in ratios.values()) else "fp32"
        entry.update(choice=choice, ratios={k: round(v, 3) for k, v in ratios.items()},
                     measured=time.strftime("%Y-%m-%dT%H:%M:%S"))
        where = f"cached in {_home_short(path)}" if _write_cache(path, key, entry) else "not cached"
        log.info("precision auto -> %s (measured on %s: %s; %s)", choice, name, _ratios_text(ratios), where)
    _decided[(str(path), key)] = choice
    return choice


def resolve(choice: str, device: torch.device | str, cfg: Any = None, *,
            networks: Mapping[str, Mapping[str, Any]] | None = None,
            measure: Callable[..., dict[str, float]] | None = None) -> str:
    """``fp32`` or ``bf16`` for a configured ``choice``; explicit choices are kept, never timed.

    ``auto``: ``$SSDD_AUTO_PRECISION`` if set; fp32 without native bf16; else bf16 only where it is
    measured faster for ``networks`` (default: the run's, from ``cfg``; without either, the demo's
    ConvNet), cached per machine (:func:`auto_choice`). Under torchrun every rank takes rank 0's
    choice, so that all ranks compute, and fingerprint, alike."""
    if choice not in CHOICES:
        raise UserError(f"precision: expected one of {', '.join(CHOICES)}, got '{choice}'")
    if choice != "auto":
        return choice
    override = _env_override()
    if override is not None:
        _once(("env", override), "precision auto -> %s (set by %s; not timed)", override, ENV_OVERRIDE)
        return override
    if networks is None:
        networks = calibration_networks(cfg) if cfg is not None else {"convnet": DEFAULT_NETWORK}
    return distributed.broadcast(auto_choice(device, networks, measure))


# ---- using a precision ----------------------------------------------------------------------

def current() -> str:
    """The precision of the stage being run (``fp32`` outside :func:`use`)."""
    return _current.get()


@contextlib.contextmanager
def _strict_fp32() -> Iterator[None]:
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
        with _strict_fp32():
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
