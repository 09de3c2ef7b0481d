"""A method's margin against its budget (issue 19's step curve, issue 20's iteration curve): one table and one
figure from run folders of the same preset, teacher and seeds that differ only in how long one method ran
(``ssdd compare --out A --set distill.krr_st.steps=100 ...``, ``--out B --set distill.krr_st.steps=1000``).

Each folder's ``METHOD`` is renamed ``METHOD@X`` (``SERIES:X=FOLDER`` makes it ``METHOD+SERIES@X`` and adds the
folder's ``random_subset+SERIES`` row), so every budget stands beside the one ``random_subset`` (and
``full_ssl``), paired by seed: the same initial draw,
pre-training seed and label draws. The baseline and the shared encoders must be the same in every folder
(they are the same fingerprinted artifacts); the script checks their accuracies agree and says so if not.
Writes ``compare.md`` / ``.csv`` / ``.json`` / ``.png`` through ssdd's compare writers, and ``curve.png``:
the paired difference (95 % t-interval) and the capture against the budget, one panel per target column;
``sets.json`` / ``sets.png``: each set's loss curve, learned lr (and lr curve) and held-out check.

    python benchmarks/schedule_curve.py --method krr_st --xlabel "krr_st steps" --out DIR \\
        --run 100=runs/qs-budget-100 --run 300=runs/qs-study-base --run 1000=runs/qs-budget-1000 \\
        --run views:300=runs/qs-study-views
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from views_study import rows_of, storage_of

from ssdd import distilled_set, layout
from ssdd.compare import write_compare
from ssdd.report_figures import pyplot, save_png

SHARED = ("random_subset", "no_pretrain", "full_ssl")


def parse_run(text: str) -> tuple[str, float, Path]:
    """``[SERIES:]X=FOLDER`` -> (series, x, folder)."""
    label, _, folder = text.partition("=")
    series, _, x = label.rpartition(":")
    if not folder or not x:
        raise SystemExit(f"--run {text!r}: expected [SERIES:]X=FOLDER, e.g. 1000=runs/qs-budget-1000")
    return series, float(x), Path(folder)


def budget_label(method: str, series: str, x: float) -> str:
    return f"{method}{'+' + series if series else ''}@{x:g}"


def merged_rows(method: str, runs: list[tuple[str, float, Path]]) -> tuple[list[dict], list[str]]:
    """The method's rows of every run, relabelled, plus the shared rows of the first run; warnings when a
    shared row differs between folders (then the pairing is not what this table claims)."""
    rows, shared, warnings = [], {}, []
    for series, x, folder in runs:
        for r in rows_of(folder, ""):
            if r["method"] == method:
                rows.append({**r, "method": budget_label(method, series, x)})
            elif r["method"] in SHARED and not (series and r["method"] != "random_subset"):
                name = r["method"] + (f"+{series}" if series else "")
                key = (name, r["target"], r["protocol"], r["label_fraction"], r["seed"])
                if key in shared and not math.isclose(shared[key]["accuracy"], r["accuracy"], abs_tol=1e-9):
                    warnings.append(f"{folder}: {key} is {r['accuracy']:.4f}, {shared[key]['accuracy']:.4f} elsewhere")
                shared.setdefault(key, {**r, "method": name})
    return list(shared.values()) + rows, warnings


def set_records(method: str, runs: list[tuple[str, float, Path]], seeds: int) -> list[dict]:
    """Per budget and seed, what the method's set recorded: its loss curve (first and last value), its learned lr
    and lr curve (MKDT) and its held-out check (KRR-ST), from the set files' headers."""
    out = []
    for series, x, folder in runs:
        for k in range(seeds):
            path = layout.distilled_path(folder, method, k)
            if not path.is_file():
                continue
            meta = distilled_set.read_meta(path)
            losses = meta.get("losses") if isinstance(meta.get("losses"), list) else []
            out.append({"budget": budget_label(method, series, x), "series": series, "x": x, "seed_index": k,
                        "file": str(path), "steps_recorded": len(losses),
                        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                        "lr": meta.get("lr"), "lr_curve": meta.get("lr_curve"), "losses": losses,
                        "heldout_check": meta.get("heldout_check")})
    return out


def records_figure(path: Path, records: list[dict], method: str) -> None:
    """Each set's loss curve, and its learned lr curve where it has one (one line per budget and seed)."""
    plt = pyplot()
    with_lr = [r for r in records if isinstance(r["lr_curve"], list) and r["lr_curve"]]
    fig, axes = plt.subplots(1, 2 if with_lr else 1, figsize=(10 if with_lr else 5.5, 3.6), squeeze=False)
    for r in records:
        if r["losses"]:
            axes[0][0].plot(range(1, len(r["losses"]) + 1), r["losses"], lw=0.8, label=f"{r['budget']} s{r['seed_index']}")
    axes[0][0].set(xscale="log", xlabel="step", ylabel="distillation loss", title=f"{method}: loss per step")
    axes[0][0].legend(fontsize=6)
    for r in with_lr:
        axes[0][1].plot(range(1, len(r["lr_curve"]) + 1), r["lr_curve"], lw=0.8, label=f"{r['budget']} s{r['seed_index']}")
    if with_lr:
        axes[0][1].set(xscale="log", xlabel="step", ylabel="learned lr", title=f"{method}: learned lr")
        axes[0][1].legend(fontsize=6)
    fig.tight_layout()
    save_png(fig, path)


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def curve_figure(path: Path, comp: dict, method: str, runs: list[tuple[str, float, Path]], xlabel: str) -> None:
    """Paired difference and capture against the budget, one column of panels per target column."""
    plt = pyplot()
    columns, ticks = comp["columns"], sorted({x for _, x, _ in runs})
    fig, axes = plt.subplots(2, len(columns), figsize=(3.6 * len(columns), 6), squeeze=False)
    for j, col in enumerate(columns):
        for series in dict.fromkeys(s for s, _, _ in runs):
            xs = sorted(x for s, x, _ in runs if s == series)
            for i, what in enumerate(("diff", "capture")):
                pts = [(x, comp["cells"].get(budget_label(method, series, x), {}).get(col["key"], {}).get(what)) for x in xs]
                pts = [(x, c) for x, c in pts if isinstance(c, dict)]
                if not pts:
                    continue
                ax = axes[i][j]
                mean = [c["mean"] for _, c in pts]
                # an unbounded end (capture when the teacher's lead is within noise) is drawn without its bar
                err = [[c["mean"] - _or(c.get("lo"), c["mean"]) for _, c in pts],
                       [_or(c.get("hi"), c["mean"]) - c["mean"] for _, c in pts]]
                ax.errorbar([x for x, _ in pts], mean, yerr=err, marker="o", capsize=3, label=series or method)
        for i, ylabel in enumerate(("minus random_subset (points)", "capture (%)")):
            ax = axes[i][j]
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xscale("log")
            ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
            ax.minorticks_off()
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{col['target']} {col['protocol']} {col['label_fraction']:g}", fontsize=9)
        axes[0][j].legend(fontsize=8)
    fig.suptitle(f"{method} against its budget, paired with random_subset (95 % intervals)", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, help="the method whose budget varies between the folders")
    parser.add_argument("--run", action="append", required=True, type=parse_run, help="[SERIES:]X=FOLDER (repeat)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--xlabel", default="steps")
    parser.add_argument("--baseline", default="random_subset")
    args = parser.parse_args()
    runs = sorted(args.run, key=lambda r: (r[0], r[1]))
    rows, warnings = merged_rows(args.method, runs)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    storage = {}
    for series, x, folder in runs:
        storage.update({budget_label(args.method, series, x): n for m, n in storage_of(folder, "").items() if m == args.method})
    args.out.mkdir(parents=True, exist_ok=True)
    note = "seeds pair across the folders " + ", ".join(str(f) for _, _, f in runs)
    path = write_compare(args.out, rows, methods, args.baseline, storage=storage, interval_note=note)
    comp = json.loads((args.out / "compare.json").read_text())
    curve_figure(args.out / "curve.png", comp, args.method, runs, args.xlabel)
    records = set_records(args.method, runs, max(len(c.get("seeds", [])) for m in comp["cells"].values() for c in m.values()))
    (args.out / "sets.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "losses"} for r in records], indent=1))
    records_figure(args.out / "sets.png", records, args.method)
    print(path.read_text())
    for w in warnings:
        print("warning: shared rows differ:", w)


if __name__ == "__main__":
    main()
