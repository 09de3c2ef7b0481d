"""The run's report: mean ± std tables, paired differences with 95 % intervals, pictures.

The report states only what it compared: a difference is called beyond seed noise only when its
paired 95 % interval excludes zero, a cell with fewer than two paired seeds or no baseline says
"not compared", and nothing is concluded about settings that were not measured.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ssdd import artifacts, distilled_set, layout
from ssdd.errors import UserError
from ssdd.evaluate.stats import excludes_zero, mean_std, paired_interval, paired_values

# Baselines every method is compared with (when present in the results), in order; a baseline is
# compared with the baselines before it only (random_subset − no_pretrain, not its negation).
BASELINES = ("random_subset", "no_pretrain")
NOT_COMPARED = "not compared"


def method_order(rows: Iterable[dict], methods: Iterable[str] | None = None) -> list[str]:
    """``methods`` (those with results) first, in that order, then the other methods of ``rows`` in
    the order they first appear."""
    present = list(dict.fromkeys(r["method"] for r in rows))
    first = [m for m in (methods or []) if m in present]
    return list(dict.fromkeys(first + present))


def group_of(row: dict) -> str:
    return str(row.get("group", row.get("arch", "")))


def _settings(rows: list[dict]) -> dict[tuple, dict[str, dict[int, float]]]:
    """(target, architecture group, protocol, label_fraction) -> method -> seed -> accuracy."""
    table: dict[tuple, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        table[(r["target"], group_of(r), r["protocol"], float(r["label_fraction"]))][r["method"]][r["seed"]] = \
            float(r["accuracy"])
    return table


def fmt_fraction(frac: float) -> str:
    return f"{100 * frac:g} %"


def fmt_signed(x: float) -> str:
    """``+1.2`` / ``−0.4`` (a true minus sign)."""
    return f"{x:+.1f}".replace("-", "−")


def fmt_mean_std(values: list[float], scale: float = 100.0) -> str:
    mean, std = mean_std(values)
    if not values:
        return "–"
    return f"{scale * mean:.1f} ± {scale * std:.1f}" if len(values) > 1 else f"{scale * mean:.1f} (n=1)"


def _pairs(methods: list[str], baselines: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for m in methods:
        for b in baselines:
            if m != b and not (m in baselines and baselines.index(m) > baselines.index(b)):
                out.append((m, b))
    return out


def results_markdown(rows: list[dict], methods: Iterable[str] | None = None, interval_note: str = "",
                     baselines: tuple[str, ...] = BASELINES) -> str:
    """The mean ± std table, the paired-difference table against the baselines present, and one
    sentence per tested difference beyond seed noise (and per method vs random_subset within it)."""
    if not rows:
        return "No results."
    methods = list(methods) if methods is not None else None
    table, order = _settings(rows), method_order(rows, methods)
    absent = [m for m in (methods or []) if m not in order]
    lines = [f"No results for: {', '.join(absent)}.", ""] if absent else []
    lines += ["Test accuracy (%), mean ± std over seeds (n=1: a single seed, no spread):", "",
             "| target | arch | protocol | labels | " + " | ".join(order) + " |",
             "|---|---|---|---|" + "---|" * len(order)]
    for (target, arch, protocol, frac), by_method in sorted(table.items()):
        cells = [fmt_mean_std(list(by_method.get(m, {}).values())) for m in order]
        lines.append(f"| {target} | {arch} | {protocol} | {fmt_fraction(frac)} | " + " | ".join(cells) + " |")

    present = [b for b in baselines if b in order]
    lines += ["", "### Paired differences", ""]
    if not present:
        lines.append(f"{NOT_COMPARED}: none of the baselines ({', '.join(baselines)}) is in the results, so no "
                     "method is compared with anything.")
        return "\n".join(lines)
    lines += ["Differences in accuracy points, method − baseline, paired by seed; 95 % Student-t interval of "
              "the mean per-seed difference over the paired seeds (same seed number = same label draw). "
              "An interval that excludes 0 is a difference beyond seed noise."
              + (f" What the interval covers: {interval_note.strip().rstrip('.')}." if interval_note.strip() else
                 " What else varies between seeds was not stated for these results."), ""]
    missing = [b for b in baselines if b not in order]
    if missing:
        lines += [f"{NOT_COMPARED} with {', '.join(missing)}: no results for "
                  f"{'it' if len(missing) == 1 else 'them'}.", ""]
    lines += ["| target | arch | protocol | labels | comparison | difference | 95 % interval | pairs |",
              "|---|---|---|---|---|---|---|---|"]
    tested = []
    for (target, arch, protocol, frac), by_method in sorted(table.items()):
        where = f"{target} ({arch}, {protocol}, {fmt_fraction(frac)} labels)"
        for m, b in _pairs(order, tuple(present)):
            if m not in by_method:
                continue
            head = f"| {target} | {arch} | {protocol} | {fmt_fraction(frac)} | {m} − {b} |"
            if b not in by_method:
                lines.append(f"{head} {NOT_COMPARED} (no {b} result here) | – | 0 |")
                continue
            seeds, a, base = paired_values(by_method[m], by_method[b])
            if len(seeds) < 2:
                lines.append(f"{head} {NOT_COMPARED} ({len(seeds)} paired seed{'s' * (len(seeds) != 1)}) | – | "
                             f"{len(seeds)} |")
                continue
            mean, lo, hi = paired_interval(a, base)
            lines.append(f"{head} {fmt_signed(100 * mean)} | [{fmt_signed(100 * lo)}, {fmt_signed(100 * hi)}] | "
                         f"{len(seeds)} |")
            tested.append((m, b, where, mean, lo, hi))
    lines.append("")
    if not tested:
        lines.append("Nothing was tested: no method has two or more seeds paired with a baseline.")
        return "\n".join(lines)
    beyond = [t for t in tested if excludes_zero(t[4], t[5])]
    if beyond:
        lines += ["Tested differences whose 95 % interval excludes zero:", ""]
        lines += [f"- {m} − {b} = {fmt_signed(100 * mean)} points on {where}" for m, b, where, mean, _, _ in beyond]
    else:
        lines.append(f"None of the {len(tested)} tested differences has a 95 % interval that excludes zero.")
    lines.append("")
    within: dict[str, list[str]] = defaultdict(list)
    for m, b, where, _, lo, hi in tested:
        if b == "random_subset" and not excludes_zero(lo, hi):
            within[m].append(where)
    for m, wheres in within.items():
        lines += [f"{m} vs random_subset is within seed noise on {'; '.join(wheres)}.", ""]
    return "\n".join(lines)


# ---- the held-out check ------------------------------------------------------------------

HELDOUT_LABELS = {
    "init": "initial set (the distillation's starting images)",
    "distilled": "distilled set",
    "other_random_subset": "another random real subset (an independent draw)",
}


def heldout_markdown(check: dict) -> str:
    """The distillation objective on held-out real batches. Each distinct number is shown once: keys
    holding the same value are one row, so no number appears as a copy of another."""
    values = {k: float(v) for k, v in check.items() if k != "note" and isinstance(v, (int, float))}
    if not values:
        return ""
    rows: dict[float, list[str]] = {}
    for key, value in values.items():
        rows.setdefault(value, []).append(HELDOUT_LABELS.get(key, key))
    lines = ["## Does distillation optimise its objective?", "",
             "The distillation loss on held-out real batches, with fresh models not used in distillation "
             "(one measurement each, no interval):", "", "| set | held-out loss |", "|---|---|"]
    lines += [f"| {' = '.join(names)} | {value:.5g} |" for value, names in rows.items()]
    lines.append("")
    if "distilled" in values and "init" in values and values["init"] > 0:
        d, i = values["distilled"], values["init"]
        lines.append(f"The distilled set's held-out loss is {'lower' if d < i else 'not lower'} than its initial "
                     f"set's ({d / i:.1%} of it).")
    if "distilled" in values and "other_random_subset" in values and values["other_random_subset"] > 0:
        d, o = values["distilled"], values["other_random_subset"]
        lines.append(f"Against an independent random subset it is {'lower' if d < o else 'not lower'} "
                     f"({d / o:.1%} of it).")
    if check.get("note"):
        lines.append(str(check["note"]))
    return "\n".join(lines) + "\n"


def _read_heldout_check(out: Path) -> dict | None:
    """The held-out check KRR-ST records in its first seed's set (other methods record none)."""
    path = layout.distilled_path(out, "krr_st", 0)
    if not path.is_file():
        return None
    try:
        check = distilled_set.read_meta(path).get("heldout_check")
    except UserError:
        return None
    return check if isinstance(check, dict) else None


# ---- figures -----------------------------------------------------------------------------

def _save_png(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    artifacts.write_bytes(path, buf.getvalue())


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def image_grid(path: Path, distilled: Path, initial: Path, count: int = 20) -> None:
    """Distilled images (top rows) above the real images they started from (bottom rows)."""
    plt = _pyplot()
    x, x0 = distilled_set.load(distilled).pixels(), distilled_set.load(initial).pixels()
    count = min(count, len(x), len(x0))
    fig, axes = plt.subplots(2, count, figsize=(count * 0.8, 2.0), squeeze=False)
    for row, (imgs, label) in enumerate(((x[:count].permute(0, 2, 3, 1).numpy(), "distilled"),
                                         (x0[:count].permute(0, 2, 3, 1).numpy(), "initial"))):
        for i in range(count):
            ax = axes[row, i]
            ax.imshow(imgs[i].squeeze(-1) if imgs.shape[-1] == 1 else imgs[i], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        axes[row, 0].set_ylabel(label, fontsize=7)
    _save_png(fig, path)
    plt.close(fig)


def curve_plot(path: Path, curves: dict[str, list[float]], title: str, xlabel: str, smooth: int = 1,
               ylabel: str = "loss") -> None:
    """All curves on one axis (log scale when every value is positive)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    positive = True
    for name, ys in curves.items():
        y = np.asarray(ys, float)
        y = y[np.isfinite(y)]
        if smooth > 1 and len(y) > smooth:
            y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
        positive &= bool(len(y) == 0 or (y > 0).all())
        ax.plot(np.arange(len(y)), y, label=name, lw=1)
    if positive:
        ax.set_yscale("log")
    ax.set_title(title), ax.set_xlabel(xlabel), ax.set_ylabel(ylabel)
    if len(curves) > 1:
        ax.legend(fontsize=7)
    _save_png(fig, path)
    plt.close(fig)


def _curves(value: Any) -> dict[str, list[float]]:
    """Curves from a log: a list of numbers, or a dict of them (nested dicts are flattened with '/')."""
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value) and value:
        return {"": [float(v) for v in value]}
    if isinstance(value, dict):
        out = {}
        for key, sub in value.items():
            for name, curve in _curves(sub).items():
                out[f"{key}/{name}" if name else str(key)] = curve
        return out
    return {}


def _read_log(path: Path, key: str) -> dict[str, list[float]]:
    if not path.is_file():
        return {}
    try:
        data = artifacts.read_json(path)
    except UserError:
        return {}
    return _curves(data.get(key)) if isinstance(data, dict) else {}


def distill_curves(out: Path) -> dict[str, list[float]]:
    """Distillation loss curves by method (first seed): the "losses" metadata of each
    ``distilled/<method>.safetensors``. Missing or unreadable files are skipped."""
    curves = {}
    for path in layout.first_seed_sets(out):
        try:
            losses = distilled_set.read_meta(path).get("losses")
        except UserError:
            continue
        found = _curves(losses)
        if "" in found:
            curves[path.stem] = found[""]
    return curves


def _grids(out: Path, figures: Path) -> list[str]:
    """One image grid per distilled set that has a matching initial set (same starting indices when
    recorded); returns the markdown lines."""
    pairs = []
    initial = layout.distilled_path(out, "random_subset", 0)
    if initial.is_file():
        for path in layout.first_seed_sets(out):
            if path == initial:
                continue
            try:
                meta, init_meta = distilled_set.read_meta(path), distilled_set.read_meta(initial)
                same_shape = distilled_set.image_shape(path) == distilled_set.image_shape(initial)
            except UserError:
                continue  # not a readable distilled set: no picture
            same_start = meta.get("init_index") is not None and meta.get("init_index") == init_meta.get("init_index")
            if same_start and same_shape:
                pairs.append((path.stem, path, initial))
    lines = []
    for method, distilled, init in pairs:
        name = "distilled_vs_initial.png" if method == "krr_st" else f"{method}_vs_initial.png"
        try:
            image_grid(figures / name, distilled, init)
        except UserError:
            continue  # a set that does not load (its checks say why): no picture
        lines += [f"![{method}: distilled (top) and the initial real images (bottom)](figures/{name})", ""]
    return lines


def write_report(out: str | Path, methods: Iterable[str] | None = None, interval_note: str = "",
                 heldout_check: dict | None = None) -> Path:
    """``report.md`` and its figures from the artifacts in ``out``.

    ``methods``: table order (others with results follow in order of appearance). ``interval_note``:
    what varies between seeds, i.e. what the paired intervals cover. ``heldout_check``: the
    distillation's held-out check (``init``, ``distilled``, ``other_random_subset``, ``note``); when
    None it is read from ``distilled/krr_st.safetensors`` metadata.
    Figures and sections whose inputs are missing are left out.
    """
    out = Path(out)
    rows = artifacts.read_json(layout.results_paths(out)[0])
    parts = [f"# ssdd report: `{out}`", "", "## Transfer accuracy", "",
             results_markdown(rows, methods, interval_note), ""]
    check = heldout_check if heldout_check is not None else _read_heldout_check(out)
    if check:
        parts.append(heldout_markdown(check))
    figures = layout.figures_dir(out)
    parts += _grids(out, figures)
    curves = distill_curves(out)
    if curves:
        longest = max(len(c) for c in curves.values())
        curve_plot(figures / "distill_loss.png", curves, "distillation loss (training batches)", "outer step",
                   smooth=max(1, longest // 50))
        parts += ["![distillation loss](figures/distill_loss.png)", ""]
    pretrain = _read_log(layout.pretrain_log_path(out), "epoch_loss")
    if pretrain:
        curve_plot(figures / "pretrain_loss.png", pretrain, "pre-training loss on the distilled sets", "epoch")
        parts += ["![pre-training loss](figures/pretrain_loss.png)", ""]
    config_path = layout.stage_config_path(out, "evaluate")
    if config_path.is_file():
        try:
            config = artifacts.read_json(config_path).get("config")
        except (UserError, AttributeError):
            config = None
        if config is not None:
            parts += ["## Configuration", "", "```json", json.dumps(config, indent=1), "```", ""]
    path = layout.report_path(out)
    artifacts.write_bytes(path, "\n".join(parts).encode())
    return path
