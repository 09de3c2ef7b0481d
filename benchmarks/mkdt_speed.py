"""Time one MKDT iteration: ssdd's engine and the authors' code, side by side in one process.

    MKDT_OFFICIAL_DIR=/path/to/mkdt-data-distill-ssl python benchmarks/mkdt_speed.py --shape small
    MKDT_OFFICIAL_DIR=... python benchmarks/mkdt_speed.py --shape paper --syn-steps 4
    python benchmarks/mkdt_speed.py --shape small --impl ssdd --syn-steps 10 20 40   # ssdd alone, N sweep

Shapes (32 px, instance-norm ConvNet students with flattened features, exact fp32):
- ``small``: configs/quality-small.toml: m = 100, N = 10, widths [32, 64, 128], the whole set every step,
  d = 128 (its ConvNet teacher's features). The authors' ``get_network`` has no per-layer widths, so
  their loop runs ssdd's [32, 64, 128] ConvNet module in NCHW (the same layers as their ``ConvNet``).
- ``paper``: the published CIFAR shape: m = 1,000, N = 40, their ``ConvNet`` (width 128, depth 3,
  built by their ``get_network``; ssdd the same widths), d = 512 (ResNet-18 teacher), batch_syn = 256
  (their default). Its unrolled graph needs ~45 GB at N = 40, so on a small machine pass
  ``--syn-steps`` (time is linear in N: the JSON gives the N run and the N = 40 figure).

One iteration = what each loop body does: ssdd's :func:`match_trajectories` with ``iterations=1`` (expert
and epoch draw, unrolled steps, loss, backward, the three SGD steps); theirs is one pass of their
``distill.py`` loop body, run unchanged (``mkdt_official.py``; their save block is left out). ssdd uses
``batch_order="reference"`` so both unroll the same minibatch sizes. Both run in this process, in
alternating rounds (which one goes first alternates too), with ssdd's allocator setting as every ssdd
command has it; medians of wall-clock seconds and of process CPU seconds are reported (the CPU time is
less disturbed by other jobs on the machine; ``ratio_min`` compares each one's fastest round). Ends with
one JSON line: ``ratio`` = the authors' median wall seconds per iteration over ssdd's, the shape, the CPU
model. On a machine shared with other jobs, ``--threads 1`` gives stable figures: with two threads each
parallel region waits for whichever thread another job has preempted (``benchmarks/results/2026-12-03-mkdt``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mkdt_official  # noqa: E402

from ssdd.allocator import keep_freed_memory  # noqa: E402
from ssdd.data import ImageSet, Normalizer  # noqa: E402
from ssdd.distill.engines.experts import ExpertsConfig  # noqa: E402
from ssdd.distill.engines.trajectory import flat_params, match_trajectories  # noqa: E402
from ssdd.distill.engines.unroll_memory import free_memory, unroll_cost  # noqa: E402
from ssdd.distill.methods.mkdt import MkdtConfig  # noqa: E402
from ssdd.distill.registry import DistillContext  # noqa: E402
from ssdd.models import build  # noqa: E402
from ssdd.settings import DistillConfig  # noqa: E402

SHAPES = {"small": {"m": 100, "syn_steps": 10, "widths": [32, 64, 128], "d": 128, "batch_syn": 0, "their_model": None},
          "paper": {"m": 1000, "syn_steps": 40, "widths": [128, 128, 128], "d": 512, "batch_syn": 256,
                    "their_model": "ConvNet"}}
PUBLISHED_N = 40


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def spec(shape: dict) -> dict:
    return {"arch": "convnet", "in_channels": 3, "image_size": 32, "out_dim": shape["d"], "widths": shape["widths"],
            "pool": "flatten", "norm": "instance"}


class Problem:
    """One expert (start and target two epochs apart) and a synthetic set, shared by both implementations."""

    def __init__(self, shape: dict, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.shape = shape
        self.theta0 = flat_params(build(spec(shape)))
        self.theta_star = self.theta0 + 0.01 * torch.randn(self.theta0.shape, generator=gen)
        self.images = torch.randn(shape["m"], 3, 32, 32, generator=gen)
        self.targets = torch.randn(shape["m"], shape["d"], generator=gen)


def ssdd_iteration(prob: Problem, steps: int) -> Callable[[], float]:
    """One iteration of ssdd's matching loop (:func:`match_trajectories` with ``iterations=1``)."""
    shape = prob.shape
    cfg = DistillConfig(m=shape["m"], experts=ExpertsConfig(count=1, epochs=2),
                        mkdt=MkdtConfig(iterations=1, syn_steps=steps, span=2, max_start_epoch=1,
                                        batch_syn=shape["batch_syn"], batch_order="reference"))
    source = ImageSet(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    ctx = DistillContext(source=source, heldout=None, teacher=torch.nn.Identity(), norm=Normalizer([0.5] * 3, [0.25] * 3),
                         spec=spec(shape), cfg=cfg, seed=0, init_index=torch.arange(1), device="cpu", progress=False)
    model = build(spec(shape))
    trajectories = torch.stack([prob.theta0, prob.theta0, prob.theta_star])[None]
    x_s = prob.images.clone().requires_grad_(True)
    y_s = prob.targets.clone().requires_grad_(True)
    alpha = torch.tensor(0.1, requires_grad=True)
    mk = cfg.mkdt
    optimizers = [torch.optim.SGD([x_s], lr=mk.lr_images, momentum=mk.momentum),
                  torch.optim.SGD([y_s], lr=mk.lr_targets, momentum=mk.momentum),
                  torch.optim.SGD([alpha], lr=mk.lr_lr, momentum=mk.momentum)]

    def run() -> float:
        losses, _ = match_trajectories(ctx, "mkdt", mk, trajectories, model, x_s, y_s, alpha, optimizers)
        return losses[-1]
    return run


def official_iteration(off: mkdt_official.Official, prob: Problem, steps: int) -> Callable[[], float]:
    """One pass of the authors' distill.py loop body, with their optimisers and settings."""
    shape = prob.shape
    probe = build(spec(shape))
    shapes = [p.shape for p in probe.parameters()]

    def as_list(flat: torch.Tensor) -> list[torch.Tensor]:
        return [t.view(s).clone() for t, s in zip(flat.split([s.numel() for s in shapes]), shapes)]

    def get_network(*args: Any, **kwargs: Any) -> torch.nn.Module:
        if shape["their_model"] is not None:
            return off.utils.get_network(*args, **kwargs)
        return build(spec(shape)).to(memory_format=torch.contiguous_format)  # their ConvNet has one width

    image_syn = prob.images.clone().requires_grad_(True)
    label_syn = prob.targets.clone().requires_grad_(True)
    syn_lr = torch.tensor(0.1).requires_grad_(True)
    args = types.SimpleNamespace(model=shape["their_model"] or "ConvNet", syn_steps=steps,
                                 batch_syn=shape["batch_syn"] or shape["m"], dsa=False, no_aug=True,
                                 distributed=False, load_all=True, max_start_epoch=1, expert_epochs=2, device="cpu")
    ns = dict(vars(off.distill))
    ns.update(args=args, get_network=get_network, channel=3, im_size=(32, 32), image_syn=image_syn,
              label_syn=label_syn, syn_lr=syn_lr, criterion=torch.nn.MSELoss(),
              buffer=[[as_list(prob.theta0), as_list(prob.theta0), as_list(prob.theta_star)]],
              pbar=types.SimpleNamespace(set_postfix=lambda *a, **k: None),
              optimizer_img=torch.optim.SGD([image_syn], lr=1000.0, momentum=0.5),
              optimizer_labels=torch.optim.SGD([label_syn], lr=1.0, momentum=0.5),
              optimizer_lr=torch.optim.SGD([syn_lr], lr=1e-4, momentum=0.5))

    def run() -> float:
        ns["it"] = 1
        mkdt_official.run(off.iteration, ns)
        return float(ns["grand_loss"].detach())
    return run


def unroll_gb(shape: dict, steps: int) -> float:
    """ssdd's own estimate of one iteration's peak (unroll_memory), in GB."""
    batch = shape["batch_syn"] or shape["m"]
    cost = unroll_cost(build(spec(shape)), (3, 32, 32), shape["d"], shape["m"], torch.nn.functional.mse_loss, "cpu")
    return cost.need(steps, batch) / 1e9


def time_rounds(impls: dict[str, Callable[[], float]], rounds: int, warmup: int) -> dict[str, dict]:
    names = list(impls)
    for _ in range(warmup):
        for name in names:
            impls[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            c, w = time.process_time(), time.perf_counter()
            loss = impls[name]()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
            print(json.dumps({"round": r, "impl": name, "wall_s": round(wall[name][-1], 3),
                              "cpu_s": round(cpu[name][-1], 3), "loss": loss}), file=sys.stderr, flush=True)
    return {n: {"median_s": statistics.median(wall[n]), "min_s": min(wall[n]), "cpu_median_s": statistics.median(cpu[n]),
                "wall_s": [round(v, 3) for v in wall[n]], "cpu_s": [round(v, 3) for v in cpu[n]]} for n in names}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--syn-steps", type=int, nargs="+", default=None, help="N (several: one run per N)")
    parser.add_argument("--m", type=int, default=None, help="synthetic set size (default: the shape's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--impl", choices=["both", "ssdd", "official"], default="both")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--official", default=None, help="the authors' checkout (default: $MKDT_OFFICIAL_DIR)")
    args = parser.parse_args(argv)
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    off = mkdt_official.Official(args.official) if args.impl != "ssdd" else None
    lines = []
    for steps in args.syn_steps or [SHAPES[args.shape]["syn_steps"]]:
        shape = dict(SHAPES[args.shape], **({"m": args.m} if args.m else {}))
        need, free = unroll_gb(shape, steps), (free_memory("cpu") or (float("inf"), ""))[0] / 1e9
        if need > 0.9 * free:
            raise SystemExit(f"--shape {args.shape} with N = {steps}: ~{need:.1f} GB per iteration, {free:.1f} GB "
                             f"free; pass a smaller --syn-steps")
        prob = Problem(shape)
        impls = {}
        if args.impl in ("both", "ssdd"):
            impls["ssdd"] = ssdd_iteration(prob, steps)
        if off is not None:
            impls["official"] = official_iteration(off, prob, steps)
        load_before = os.getloadavg()
        res = time_rounds(impls, args.rounds, args.warmup)
        line = {"shape": args.shape, "m": shape["m"], "syn_steps": steps, "batch_syn": shape["batch_syn"] or shape["m"],
                "widths": shape["widths"], "d": shape["d"], "precision": "fp32", "rounds": args.rounds,
                "estimated_unroll_gb": round(need, 2), **{f"{k}_{n}": v for n, r in res.items() for k, v in r.items()}}
        if "ssdd" in res and "official" in res:
            line["ratio"] = res["official"]["median_s"] / res["ssdd"]["median_s"]
            line["cpu_ratio"] = res["official"]["cpu_median_s"] / res["ssdd"]["cpu_median_s"]
            line["ratio_min"] = res["official"]["min_s"] / res["ssdd"]["min_s"]  # each one's least disturbed round
        if steps != PUBLISHED_N and args.shape == "paper":
            line.update({f"{n}_median_s_at_N{PUBLISHED_N}": r["median_s"] * PUBLISHED_N / steps for n, r in res.items()})
        line.update(cpu=cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__,
                    loadavg_before=[round(v, 2) for v in load_before], loadavg_after=[round(v, 2) for v in os.getloadavg()],
                    peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2))
        print(json.dumps(line), flush=True)
        lines.append(line)
    return lines


if __name__ == "__main__":
    main()
