"""Data-parallel scaling: the same global work in 1 process and in N torchrun processes.

    python benchmarks/ddp_scaling.py --procs 2 --threads 2 --steps 6

Times, in one run, the KRR-ST outer step (m = 200, real batch 256, ConvNet 64-128-256 students
and teacher, 32 px, fp32) and the Barlow Twins teacher step (batch 256), first in one process with ``--threads`` threads, then under
``torchrun --nproc_per_node=N`` with ``threads / N`` threads each (the same cores in all), and
prints one JSON line per (stage, processes) and the ratios. On a CPU the cores are the limit, so
expect no speed-up there: the point is what the collectives cost. On GPUs each process has its
own device. Never an asserting test: it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def worker(steps: int, device: str) -> None:
    """Inside one process of the measured group: time both stages, print JSON on rank 0."""
    from ssdd import distributed, precision
    from ssdd.checkpoint import Hooks
    from ssdd.config import ModelConfig, TeacherConfig
    from ssdd.data import ImageSet, Normalizer
    from ssdd.distill import DistillContext, distill_krr_st, random_index
    from ssdd.distill.engines.krr_engine import KrrStConfig
    from ssdd.models import build
    from ssdd.settings import DistillConfig
    from ssdd.teacher import FeatureExtractor
    from ssdd.teacher.train import train_barlow_twins

    device = distributed.setup(device)
    gen = torch.Generator().manual_seed(0)
    source = ImageSet(torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8, generator=gen))
    norm = Normalizer(*source.mean_std(), device=device)
    spec = {"arch": "convnet", "in_channels": 3, "image_size": 32, "widths": [64, 128, 256], "pool": "flatten",
            "out_dim": 0}
    torch.manual_seed(0)
    teacher = FeatureExtractor(build({**spec, "pool": "gap"})).to(device).eval()
    stamps: list[float] = []

    def due(step: int) -> bool:  # called after every step: a clock, not a checkpoint
        stamps.append(time.perf_counter())
        return False

    results = {}
    with precision.use("fp32"):
        cfg = DistillConfig(m=200, batch=256, krr_st=KrrStConfig(steps=steps + 2, pool_size=4, pool_max_age=4, compile="off"))
        ctx = DistillContext(source, None, teacher, norm, {**spec, "out_dim": 256}, cfg, 0,
                             random_index(len(source), cfg.m, 0), device, False,
                             Hooks(checkpoint=lambda state: None, checkpoint_due=due))
        distill_krr_st(ctx)
        results["krr_st outer step"] = [b - a for a, b in zip(stamps[1:], stamps[2:])]
        stamps.clear()
        tcfg = TeacherConfig(model=ModelConfig(widths=[64, 128, 256], pool="gap"), epochs=1, batch=256,
                             projector=[512, 512], hue=0.0)
        data = ImageSet(source.images[:256 * (steps + 2)])
        train_barlow_twins(data, norm, tcfg, 0, device, progress=False, checkpoint=lambda state: None,
                           checkpoint_due=due, data_parallel=True)
        results["barlow twins step"] = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    if distributed.is_main():
        for stage, times in results.items():
            print(json.dumps({"stage": stage, "procs": distributed.world(), "threads_per_proc": torch.get_num_threads(),
                              "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
                              "steps": len(times)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores in all, for every run")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.device)
        return
    from ssdd.precision import cpu_model

    print(json.dumps({"benchmark": "ddp_scaling", "cpu": cpu_model(), "cores": os.cpu_count(),
                      "torch": torch.__version__, "procs": args.procs, "threads": args.threads}), flush=True)
    me = [os.path.abspath(__file__), "--worker", "--steps", str(args.steps), "--device", args.device]
    runs = {1: ([sys.executable, *me], args.threads),
            args.procs: ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc_per_node={args.procs}", *me], max(1, args.threads // args.procs))}
    rows: dict[tuple[str, int], dict] = {}
    for procs, (cmd, threads) in runs.items():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{procs} process(es) failed:\n{out.stderr[-3000:]}")
        for line in out.stdout.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                rows[(row["stage"], procs)] = row
                print(line, flush=True)
    for stage in sorted({s for s, _ in rows}):
        one, many = rows.get((stage, 1)), rows.get((stage, args.procs))
        if one and many:
            print(json.dumps({"stage": stage, "speedup_median": round(one["median_s"] / many["median_s"], 2),
                              "note": f"{args.procs} processes x {max(1, args.threads // args.procs)} threads vs "
                                      f"1 process x {args.threads} threads"}), flush=True)


if __name__ == "__main__":
    main()
