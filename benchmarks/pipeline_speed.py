"""Time each pipeline stage of a preset: this tree against an earlier commit, side by side in one run.

    python benchmarks/pipeline_speed.py --preset demo --baseline fafefca
    python benchmarks/pipeline_speed.py --preset shared-small --baseline fafefca --stages teacher distill

The baseline commit is checked out in a temporary git worktree and run with the same interpreter
and packages (``PYTHONPATH=<worktree>/src``); each stage is one ``python -m ssdd <stage>``
subprocess into its own output folder, baseline first and then this tree, stage by stage, so that
slow drift of the machine touches both alike. Prints one JSON line per stage (seconds for each,
the ratio baseline / current) and the CPU model. Without ``--baseline`` it times this tree only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ssdd.precision import cpu_model

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "teacher", "distill", "pretrain", "evaluate")


def run_stage(src: Path, stage: str, preset: str, out: Path, overrides: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(src), "SSDD_CONFIGS": str(src.parent / "configs")}
    cmd = [sys.executable, "-m", "ssdd", stage, "--preset", preset, "--out", str(out), "--no-progress"]
    for item in overrides:
        cmd += ["--set", item]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"{stage} failed in {src.parent}: {' | '.join(tail)}")
    precision = next((line.split("precision ", 1)[1].split(" ")[0] for line in proc.stderr.splitlines()
                      if "precision " in line and " on " in line), "fp32")
    return wall, precision


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--baseline", help="a commit to compare against (checked out in a temporary worktree)")
    p.add_argument("--stages", nargs="+", default=list(STAGES[1:]), choices=STAGES[1:],
                   help="stages to time (prepare always runs first, untimed)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for both trees (repeatable)")
    p.add_argument("--keep", action="store_true", help="keep the output folders")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="ssdd-pipeline-speed-"))
    trees: dict[str, Path] = {"current": REPO / "src"}
    if args.baseline:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", args.baseline], capture_output=True, text=True,
                             check=True).stdout.strip()
        worktree = work / f"baseline-{sha[:8]}"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), sha],
                       capture_output=True, check=True)
        trees = {f"baseline {sha[:8]}": worktree / "src", **trees}
    print(json.dumps({"benchmark": "pipeline_speed", "preset": args.preset, "cpu": cpu_model(),
                      "cores": os.cpu_count(), "trees": list(trees)}), flush=True)
    totals = {name: 0.0 for name in trees}
    try:
        for stage in ["prepare", *[s for s in STAGES[1:] if s in args.stages]]:
            line: dict = {"stage": stage}
            for name, src in trees.items():
                wall, precision = run_stage(src, stage, args.preset, work / "runs" / name.replace(" ", "-"),
                                            args.overrides)
                line[name] = round(wall, 1)
                line[f"{name} precision"] = precision
                if stage != "prepare":
                    totals[name] += wall
            if len(trees) == 2:
                base, cur = list(trees)
                line["speedup"] = round(line[base] / line[cur], 2)
            print(json.dumps(line), flush=True)
        summary = {"stage": "total (timed stages)", **{k: round(v, 1) for k, v in totals.items()}}
        if len(trees) == 2:
            base, cur = list(trees)
            summary["speedup"] = round(totals[base] / totals[cur], 2)
        print(json.dumps(summary), flush=True)
    finally:
        if args.baseline:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], capture_output=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(json.dumps({"kept": str(work)}))


if __name__ == "__main__":
    main()
