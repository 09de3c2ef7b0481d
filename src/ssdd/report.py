"""The run's report: mean ± std tables, paired differences with 95 % intervals, pictures."""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

from ssdd import artifacts

BASELINES = ("random_subset", "no_pretrain")
METHOD_ORDER = ("krr_st", "random_subset", "no_pretrain", "full_ssl", "gaussian_noise", "supervised_teacher")


def paired_interval(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of the per-seed differences a - b and its two-sided t interval over seeds."""
    d = np.asarray(a, float) - np.asarray(b, float)
    if len(d) < 2:
        return float(d.mean()), float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def _settings(rows: list[dict]) -> dict[tuple, dict[str, dict[int, float]]]:
    """(target, architecture group, protocol, label_fraction) -> method -> seed -> accuracy."""
    table: dict[tuple, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        table[(r["target"], r.get("group", r.get("arch", "")), r["protocol"], r["label_fraction"])][r["method"]][r["seed"]] = r["accuracy"]
    return table


def _methods(rows: list[dict]) -> list[str]:
    present = {r["method"] for r in rows}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def results_markdown(rows: list[dict]) -> str:
    """The mean ± std table and the paired-difference table, with a sentence per significant difference."""
    table, methods = _settings(rows), _methods(rows)
    lines = ["| target | arch | protocol | labels | " + " | ".join(methods) + " |",
             "|---|---|---|---|" + "---|" * len(methods)]
    for (target, arch, protocol, frac), by_method in sorted(table.items()):
        cells = []
        for m in methods:
            accs = list(by_method.get(m, {}).values())
            cells.append(f"{100 * np.mean(accs):.1f} ± {100 * np.std(accs, ddof=1) if len(accs) > 1 else 0:.1f}"
                         if accs else "–")
        lines.append(f"| {target} | {arch} | {protocol} | {frac:.0%} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences in accuracy points (same seeds; mean and 95 % t-interval over seeds):", "",
              "| target | arch | protocol | labels | comparison | difference | 95 % interval |",
              "|---|---|---|---|---|---|---|"]
    findings = []
    for (target, arch, protocol, frac), by_method in sorted(table.items()):
        for m in methods:
            for base in BASELINES:
                if m == base or base not in by_method or m not in by_method or (m, base) == ("no_pretrain", "random_subset"):
                    continue
                seeds = sorted(set(by_method[m]) & set(by_method[base]))
                if len(seeds) < 2:
                    continue  # no interval from one seed
                mean, lo, hi = paired_interval([by_method[m][s] for s in seeds], [by_method[base][s] for s in seeds])
                lines.append(f"| {target} | {arch} | {protocol} | {frac:.0%} | {m} − {base} | {100 * mean:+.1f} | "
                             f"[{100 * lo:+.1f}, {100 * hi:+.1f}] |")
                if lo > 0 or hi < 0:
                    findings.append(f"{m} {'beats' if mean > 0 else 'trails'} {base} by {100 * abs(mean):.1f} points "
                                    f"on {target} ({arch}, {protocol}, {frac:.0%} labels)")
    lines.append("")
    if findings:
        lines.append("Differences whose 95 % interval excludes zero (beyond seed noise): " + "; ".join(findings) + ".")
    else:
        lines.append("No paired difference has a 95 % interval that excludes zero: all are within seed noise.")
    krr = [f for f in findings if f.startswith("krr_st") and "random_subset" in f]
    lines.append("")
    lines.append("KRR-ST against the random real subset with teacher targets: " +
                 ("; ".join(krr) + "." if krr else "no difference beyond seed noise in any setting "
                  "(as the MKDT re-evaluation also found)."))
    return "\n".join(lines)


def _save_png(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    artifacts.write_bytes(path, buf.getvalue())


def image_grid(path: Path, distilled: Path, initial: Path, count: int = 20) -> None:
    """Distilled images (top rows) above the real images they started from (bottom rows)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, _, meta = artifacts.load_distilled(distilled)
    x0, _, _ = artifacts.load_distilled(initial)
    count = min(count, len(x))
    mean = np.asarray(meta.get("mean", [0.0]), float).reshape(1, -1, 1, 1)
    std = np.asarray(meta.get("std", [1.0]), float).reshape(1, -1, 1, 1)

    def to_pixels(t):
        a = t[:count].numpy().astype(float)
        a = a * std + mean if meta.get("image_space") == "normalized" else a
        return np.clip(a, 0, 1).transpose(0, 2, 3, 1)

    fig, axes = plt.subplots(2, count, figsize=(count * 0.8, 2.0))
    for row, (imgs, label) in enumerate(((to_pixels(x), "distilled"), (to_pixels(x0), "initial"))):
        for i in range(count):
            ax = axes[row, i]
            ax.imshow(imgs[i].squeeze(-1) if imgs.shape[-1] == 1 else imgs[i], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        axes[row, 0].set_ylabel(label, fontsize=7)
    _save_png(fig, path)
    plt.close(fig)


def curve_plot(path: Path, curves: dict[str, list[float]], title: str, xlabel: str, smooth: int = 1) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ys in curves.items():
        y = np.asarray(ys, float)
        if smooth > 1 and len(y) > smooth:
            y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
        ax.plot(np.arange(len(y)), y, label=name, lw=1)
    ax.set_yscale("log"), ax.set_title(title), ax.set_xlabel(xlabel), ax.set_ylabel("MSE")
    if len(curves) > 1:
        ax.legend(fontsize=7)
    _save_png(fig, path)
    plt.close(fig)


def write_report(out: str | Path) -> Path:
    """``report.md`` and its figures from the artifacts in ``out``."""
    out = Path(out)
    rows = artifacts.read_json(out / "results.json")
    parts = [f"# ssdd report: `{out}`", "", "## Transfer accuracy (%)", "", results_markdown(rows), ""]
    check_path = out / "distill_check.json"
    if check_path.is_file():
        check = artifacts.read_json(check_path)
        better = check["heldout_loss_distilled"] < min(check["heldout_loss_init"], check["heldout_loss_random_subset"])
        parts += ["## Does distillation optimise its objective?", "",
                  "KRR-ST loss on held-out real batches, with fresh models not used in distillation:", "",
                  "| set | held-out loss |", "|---|---|"]
        for key in ("heldout_loss_init", "heldout_loss_distilled", "heldout_loss_random_subset",
                    "heldout_loss_other_random_subset"):
            if key in check:
                parts.append(f"| {key.removeprefix('heldout_loss_')} | {check[key]:.5f} |")
        parts += ["", f"The distilled set's held-out loss is {'lower' if better else 'NOT lower'} than at its start "
                  f"({check['heldout_loss_distilled'] / check['heldout_loss_init']:.1%} of it). {check.get('note', '')}", ""]
    figures = out / "figures"
    if (out / "distilled.safetensors").is_file():
        image_grid(figures / "distilled_vs_initial.png", out / "distilled.safetensors", out / "random_subset.safetensors")
        parts += ["![distilled (top) and initial real images (bottom)](figures/distilled_vs_initial.png)", ""]
    if (out / "distill_log.json").is_file():
        losses = artifacts.read_json(out / "distill_log.json")["loss"]
        curve_plot(figures / "distill_loss.png", {"outer loss": losses}, "KRR-ST outer loss (training batches)",
                   "outer step", smooth=max(1, len(losses) // 50))
        parts += ["![distillation loss](figures/distill_loss.png)", ""]
    if (out / "pretrain_log.json").is_file():
        curves = artifacts.read_json(out / "pretrain_log.json")["epoch_loss"]
        curve_plot(figures / "pretrain_loss.png", curves, "pre-training loss on the distilled sets", "epoch")
        parts += ["![pre-training loss](figures/pretrain_loss.png)", ""]
    config_path = out / "config.evaluate.json"
    if config_path.is_file():
        parts += ["## Configuration", "", "```json", json.dumps(artifacts.read_json(config_path)["config"], indent=1),
                  "```", ""]
    path = out / "report.md"
    artifacts.write_bytes(path, "\n".join(parts).encode())
    return path
