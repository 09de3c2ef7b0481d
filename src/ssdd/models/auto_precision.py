"""What ``precision = "auto"`` means on this machine: bf16 only where it is *measured* faster.

The first ``auto`` run on a machine times one forward+backward of the run's teacher and student
networks in fp32 and bf16 (about 2 s, :func:`time_passes`) and caches the decision in
``$SSDD_CACHE_DIR/precision.json`` (default ``~/.cache/ssdd``), keyed by device model, torch version
and network specs: the choice enters artifact fingerprints, so it must not flip between runs on one
machine. Hardware without native bf16 is fp32, never timed. ``SSDD_AUTO_PRECISION=fp32|bf16``
overrides ``auto``. Why measure at all, and what was measured: :mod:`ssdd.precision`.

It lives with the models because it builds and times them; the pipeline hands it the specs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ssdd import distributed
from ssdd import precision as precision_mod
from ssdd.errors import UserError
from ssdd.models.registry import build

ENV_OVERRIDE = "SSDD_AUTO_PRECISION"
ENV_CACHE_DIR = "SSDD_CACHE_DIR"
MIN_SPEEDUP = 1.05  # bf16 must beat fp32 by 5 % on every network: below that, timing noise decides
CALIBRATION_BUDGET_S = 2.0
CACHE_VERSION = 1

log = logging.getLogger("ssdd")
_decided: dict[tuple[str, str], str] = {}  # (cache file, key) -> choice: one process measures and reads once
_logged: set[tuple] = set()


def cache_path() -> Path:
    """``$SSDD_CACHE_DIR/precision.json``, else ``~/.cache/ssdd/precision.json``."""
    root = os.environ.get(ENV_CACHE_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "ssdd")
    return Path(root) / "precision.json"


def labelled(teacher: Mapping[str, Any], student: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The networks to time, labelled for the log: one entry when teacher and student are the same
    network, else ``convnet (teacher)`` / ``convnet (student)`` (or their two architecture names)."""
    specs = {"teacher": dict(teacher), "student": dict(student)}
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
    each precision, then timed in rounds that alternate which precision goes first while the next
    round (as long as the last) ends within ``budget_s`` (counted from the start, builds and warm-ups
    included), with at least ``min_reps`` rounds. fp32 runs with TF32 off, as
    :func:`ssdd.precision.use` runs it. The global RNG is left as it was: runs seed themselves, and a
    calibration must not change what they compute."""
    device = torch.device(device)
    start = time.perf_counter()
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), precision_mod.strict_fp32():
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
            with precision_mod.autocast(device, precision):
                out = model(x)
            out.float().square().mean().backward()
            _sync(device)
            return time.perf_counter() - t

        for model, x in nets.values():
            one_pass(model, x, "fp32")
            one_pass(model, x, "bf16")
        times: dict[str, dict[str, list[float]]] = {label: {"fp32": [], "bf16": []} for label in nets}
        last_round = 0.0
        for r in range(max_reps):  # a round starts only when it should end within the budget
            if r >= min_reps and time.perf_counter() - start + last_round > budget_s:
                break
            round_start = time.perf_counter()
            for label, (model, x) in nets.items():  # a pair back to back
                for precision in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
                    times[label][precision].append(one_pass(model, x, precision))
            last_round = time.perf_counter() - round_start
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
    name = precision_mod.device_name(device)
    if not precision_mod.native_bf16(device):
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


def resolve(choice: str, device: torch.device | str, networks: Mapping[str, Mapping[str, Any]] | None = None, *,
            measure: Callable[..., dict[str, float]] | None = None) -> str:
    """``fp32`` or ``bf16`` for a configured ``choice``; explicit choices are kept, never timed.

    ``auto``: ``$SSDD_AUTO_PRECISION`` if set; fp32 without native bf16; else bf16 only where it is
    measured faster for ``networks`` (build specs by label, see :func:`labelled`; default: the
    demo's ConvNet), cached per machine (:func:`auto_choice`). Under torchrun every rank takes rank 0's
    choice, so that all ranks compute, and fingerprint, alike."""
    if choice not in precision_mod.CHOICES:
        raise UserError(f"precision: expected one of {', '.join(precision_mod.CHOICES)}, got '{choice}'")
    if choice != "auto":
        return choice
    override = _env_override()
    if override is not None:
        _once(("env", override), "precision auto -> %s (set by %s; not timed)", override, ENV_OVERRIDE)
        return override
    if networks is None:
        networks = {"convnet": DEFAULT_NETWORK}
    return distributed.broadcast(auto_choice(device, networks, measure))
