"""Does ``precision = "auto"`` pick bf16 only where bf16 is faster? fp32 vs bf16 forward+backward of
each preset's own networks, timed with many more rounds than the ~2 s calibration, beside auto's pick.

    python benchmarks/precision_auto.py [--presets demo quality-small] [--rounds 30] [--device auto]

For every preset: the networks auto calibrates on (teacher and student, at the preset's image size
and channels, the calibration's batch), auto's pick from a fresh calibration in a temporary cache
folder (as on a machine's first run; ``--use-cache`` reads ``$SSDD_CACHE_DIR`` / ``~/.cache/ssdd``
instead), and the careful timing: the fastest and the median ms per pass in each precision, and
the ratio fp32 time / bf16 time of the fastest passes (the calibration's statistic,
:func:`ssdd.models.auto_precision.speed_ratio`). ``SSDD_AUTO_PRECISION`` is ignored here.

Prints the device first and ends with one JSON line: ``device``, ``auto`` (preset -> pick),
``ratio_fp32_over_bf16`` ("preset/network" -> careful ratio), ``calibration_s`` (wall seconds of
each calibration), and ``auto_never_slower``: true when every network of every preset where auto
picked bf16 runs at least as fast in bf16 as in fp32 in the careful timing (where auto picked fp32
it cannot be slower than fp32). Never asserts: it reports.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time

import torch

from ssdd import precision
from ssdd.models import auto_precision
from ssdd.run import resolve_device, run_networks
from ssdd.settings import load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["demo", "quality-small"])
    p.add_argument("--rounds", type=int, default=30, help="timed rounds per network after one warm-up each")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--use-cache", action="store_true",
                   help="auto's pick from the user's cache, not from a fresh calibration")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.pop(auto_precision.ENV_OVERRIDE, None)
    dev = resolve_device(args.device)
    print(f"device {precision.describe(dev)}; torch {torch.__version__}; {torch.get_num_threads()} threads")

    picks, ratios, calibration_s, never_slower = {}, {}, {}, True
    with tempfile.TemporaryDirectory() as tmp:
        if not args.use_cache:
            os.environ[auto_precision.ENV_CACHE_DIR] = tmp
        for name in args.presets:
            cfg = load_config(name)
            networks = run_networks(cfg)
            start = time.perf_counter()
            picks[name] = auto_precision.resolve("auto", dev, networks)
            calibration_s[name] = round(time.perf_counter() - start, 2)
            times = auto_precision.time_passes(networks, dev, budget_s=0.0, min_reps=args.rounds, max_reps=args.rounds)
            for label, t in times.items():
                ratio = auto_precision.speed_ratio(t)
                ratios[f"{name}/{label}"] = round(ratio, 3)
                never_slower &= picks[name] == "fp32" or ratio >= 1.0
                batch = auto_precision.calibration_batch(dev, int(networks[label]["image_size"]))
                ms = {p: f"{1e3 * min(t[p]):6.1f} ms (median {1e3 * statistics.median(t[p]):6.1f})" for p in t}
                print(f"{name:14s} {label:18s} batch {batch:3d}: fp32 {ms['fp32']}, bf16 {ms['bf16']}, "
                      f"fp32/bf16 {ratio:.2f} ({args.rounds} rounds)")
            print(f"{name:14s} auto -> {picks[name]} (calibration {calibration_s[name]:.1f} s)")
    print(json.dumps({"device": precision.device_name(dev), "auto": picks, "ratio_fp32_over_bf16": ratios,
                      "calibration_s": calibration_s, "auto_never_slower": never_slower}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
