"""Training steps with glibc's default malloc against ssdd's kept-freed-memory setting (ssdd.allocator).

    python benchmarks/allocator.py [--rounds 3] [--steps 200] [--precision auto|fp32|bf16]

Each measurement is a fresh subprocess (malloc settings are per process), the two settings
alternate round by round so that drift of the machine touches both alike. The steps are the demo's
pre-training step (ConvNet 32-64-128, GAP, 100 images, MSE to 128-d targets) and its fine-tuning
step (batch 64, cross-entropy, 10 classes), SGD with momentum. Prints the CPU model, then one JSON
line per (step, setting, round): ms per step, minor page faults per step, kernel (sys) ms per step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

STEPS = {"pretrain": (100, 128), "finetune": (64, 10)}  # batch, outputs


def measure(kind: str, steps: int, precision: str) -> dict:
    """Run in the child: time ``steps`` training steps after 20 of warm-up."""
    import torch
    import torch.nn.functional as F

    from ssdd.allocator import keep_freed_memory
    from ssdd.models import build
    from ssdd.precision import autocast, resolve, use

    kept = keep_freed_memory()
    batch, outputs = STEPS[kind]
    torch.manual_seed(0)
    model = build({"arch": "convnet", "in_channels": 1, "image_size": 32, "out_dim": outputs,
                   "widths": [32, 64, 128], "pool": "gap"})
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 1, 32, 32)
    y = torch.randn(batch, outputs) if kind == "pretrain" else torch.randint(0, outputs, (batch,))
    loss_fn = F.mse_loss if kind == "pretrain" else F.cross_entropy
    chosen = resolve(precision, "cpu")

    def step() -> None:
        with autocast("cpu"):
            out = model(x)
        loss = loss_fn(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with use(chosen):
        for _ in range(20):
            step()
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(steps):
            step()
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"kept_freed_memory": kept, "precision": chosen, "ms_per_step": round(wall / steps * 1e3, 2),
            "minor_faults_per_step": round((after.ru_minflt - before.ru_minflt) / steps, 1),
            "sys_ms_per_step": round((after.ru_stime - before.ru_stime) / steps * 1e3, 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--child", choices=tuple(STEPS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.precision)))
        return
    import torch

    from ssdd.precision import cpu_model

    print(json.dumps({"benchmark": "allocator", "cpu": cpu_model(), "cores": os.cpu_count(),
                      "torch_threads": torch.get_num_threads()}), flush=True)
    for kind in STEPS:
        for rnd in range(args.rounds):
            for setting in ("system", "kept"):
                env = {**os.environ, "SSDD_MALLOC": setting}
                out = subprocess.run([sys.executable, __file__, "--child", kind, "--steps", str(args.steps),
                                      "--precision", args.precision], env=env, capture_output=True, text=True,
                                     check=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                print(json.dumps({"step": kind, "malloc": setting, "round": rnd, **row}), flush=True)


if __name__ == "__main__":
    main()
