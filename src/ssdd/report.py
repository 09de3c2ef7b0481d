"""The run's report: mean ± std tables, paired differences with 95 % intervals, pictures.

The report states only what it compared: a difference is called beyond seed noise only when its
paired 95 % interval excludes zero, a cell with fewer than two paired seeds or no baseline says
"not compared", and nothing is concluded about settings that were not measured. The numbers and figures
are collected once (:func:`collect`); ``report.md`` is written here, ``report.html`` by :mod:`ssdd.report_html`.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

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


def _where(key: tuple) -> str:
    target, arch, protocol, frac = key
    return f"{target} ({arch}, {protocol}, {fmt_fraction(frac)} labels)"


def results_summary(rows: list[dict], methods: Iterable[str] | None = None,
                    baselines: tuple[str, ...] = BASELINES) -> dict:
    """The numbers of the report's tables, computed once: :func:`results_markdown` and the HTML page
    (:mod:`ssdd.report_html`) both render this, so the two never disagree.

    ``methods``: column order; ``absent``: asked for but without results; ``settings``: per (target,
    arch, protocol, label_fraction) ``key`` each method's ``seed -> accuracy``; ``present`` / ``missing``:
    the baselines with and without results; ``pairs``: per setting and (method, baseline) the paired
    difference, ``status`` "tested" (``mean``, ``lo``, ``hi`` as accuracy fractions, ``beyond_noise``),
    "no baseline" or "too few pairs", with ``n_pairs``."""
    methods = list(methods) if methods is not None else None
    table, order = _settings(rows), method_order(rows, methods)
    present = [b for b in baselines if b in order]
    settings, pairs = [], []
    for key, by_method in sorted(table.items()):
        settings.append({"key": key, "values": {m: dict(by_method[m]) for m in order if m in by_method}})
        for m, b in _pairs(order, tuple(present)):
            if m not in by_method:
                continue
            pair: dict[str, Any] = {"key": key, "method": m, "baseline": b, "status": "no baseline", "n_pairs": 0}
            if b in by_method:
                seeds, a, base = paired_values(by_method[m], by_method[b])
                pair.update(status="too few pairs", n_pairs=len(seeds))
                if len(seeds) >= 2:
                    mean, lo, hi = paired_interval(a, base)
                    pair.update(status="tested", mean=mean, lo=lo, hi=hi, beyond_noise=excludes_zero(lo, hi))
            pairs.append(pair)
    return {"methods": order, "absent": [m for m in (methods or []) if m not in order], "baselines": list(baselines),
            "present": present, "missing": [b for b in baselines if b not in order], "settings": settings,
            "pairs": pairs}


def fmt_setting(key: tuple) -> list[str]:
    """A setting's table cells: target, arch, protocol, labels."""
    target, arch, protocol, frac = key
    return [target, arch, protocol, fmt_fraction(frac)]


def pair_cells(pair: dict) -> list[str]:
    """A paired difference's table cells: comparison, difference, 95 % interval, pairs."""
    m, b, n = pair["method"], pair["baseline"], pair["n_pairs"]
    if pair["status"] == "no baseline":
        return [f"{m} − {b}", f"{NOT_COMPARED} (no {b} result here)", "–", "0"]
    if pair["status"] != "tested":
        return [f"{m} − {b}", f"{NOT_COMPARED} ({n} paired seed{'s' * (n != 1)})", "–", str(n)]
    return [f"{m} − {b}", fmt_signed(100 * pair["mean"]),
            f"[{fmt_signed(100 * pair['lo'])}, {fmt_signed(100 * pair['hi'])}]", str(n)]


MEANS_INTRO = "Test accuracy (%), mean ± std over seeds (n=1: a single seed, no spread):"
NOTHING_TESTED = "Nothing was tested: no method has two or more seeds paired with a baseline."
BEYOND_INTRO = "Tested differences whose 95 % interval excludes zero:"


def no_baseline_text(baselines: list[str]) -> str:
    return (f"{NOT_COMPARED}: none of the baselines ({', '.join(baselines)}) is in the results, so no "
            "method is compared with anything.")


def paired_intro(interval_note: str = "") -> str:
    """What the paired-differences table holds and what its intervals cover."""
    return ("Differences in accuracy points, method − baseline, paired by seed; 95 % Student-t interval of "
            "the mean per-seed difference over the paired seeds (same seed number = same label draw). "
            "An interval that excludes 0 is a difference beyond seed noise."
            + (f" What the interval covers: {interval_note.strip().rstrip('.')}." if interval_note.strip() else
               " What else varies between seeds was not stated for these results."))


def missing_text(missing: list[str]) -> str:
    return f"{NOT_COMPARED} with {', '.join(missing)}: no results for {'it' if len(missing) == 1 else 'them'}."


def none_beyond_text(tested: int) -> str:
    return f"None of the {tested} tested differences has a 95 % interval that excludes zero."


def conclusions(summary: dict) -> dict:
    """What the tested differences say: ``tested`` (how many), ``beyond`` (one line per difference whose
    interval excludes zero), ``within`` (one sentence per method within seed noise of random_subset)."""
    tested = [p for p in summary["pairs"] if p["status"] == "tested"]
    beyond = [f"{p['method']} − {p['baseline']} = {fmt_signed(100 * p['mean'])} points on {_where(p['key'])}"
              for p in tested if p["beyond_noise"]]
    within: dict[str, list[str]] = defaultdict(list)
    for p in tested:
        if p["baseline"] == "random_subset" and not p["beyond_noise"]:
            within[p["method"]].append(_where(p["key"]))
    return {"tested": len(tested), "beyond": beyond,
            "within": [f"{m} vs random_subset is within seed noise on {'; '.join(w)}." for m, w in within.items()]}


def results_markdown(rows: list[dict], methods: Iterable[str] | None = None, interval_note: str = "",
                     baselines: tuple[str, ...] = BASELINES) -> str:
    """The mean ± std table, the paired-difference table against the baselines present, and one
    sentence per tested difference beyond seed noise (and per method vs random_subset within it)."""
    if not rows:
        return "No results."
    return summary_markdown(results_summary(rows, methods, baselines), interval_note)


def summary_markdown(summary: dict, interval_note: str = "") -> str:
    """:func:`results_markdown` from a :func:`results_summary`."""
    order = summary["methods"]
    lines = [f"No results for: {', '.join(summary['absent'])}.", ""] if summary["absent"] else []
    lines += [MEANS_INTRO, "", "| target | arch | protocol | labels | " + " | ".join(order) + " |",
              "|---|---|---|---|" + "---|" * len(order)]
    for setting in summary["settings"]:
        cells = [fmt_mean_std(list(setting["values"].get(m, {}).values())) for m in order]
        lines.append("| " + " | ".join(fmt_setting(setting["key"]) + cells) + " |")
    lines += ["", "### Paired differences", ""]
    if not summary["present"]:
        lines.append(no_baseline_text(summary["baselines"]))
        return "\n".join(lines)
    lines += [paired_intro(interval_note), ""]
    if summary["missing"]:
        lines += [missing_text(summary["missing"]), ""]
    lines += ["| target | arch | protocol | labels | comparison | difference | 95 % interval | pairs |",
              "|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(fmt_setting(p["key"]) + pair_cells(p)) + " |" for p in summary["pairs"]]
    lines.append("")
    said = conclusions(summary)
    if not said["tested"]:
        lines.append(NOTHING_TESTED)
        return "\n".join(lines)
    if said["beyond"]:
        lines += [BEYOND_INTRO, ""] + [f"- {line}" for line in said["beyond"]]
    else:
        lines.append(none_beyond_text(said["tested"]))
    lines.append("")
    for sentence in said["within"]:
        lines += [sentence, ""]
    return "\n".join(lines)


# ---- the held-out check ------------------------------------------------------------------

HELDOUT_LABELS = {
    "init": "initial set (the distillation's starting images)",
    "distilled": "distilled set",
    "other_random_subset": "another random real subset (an independent draw)",
}


HELDOUT_TITLE = "Does distillation optimise its objective?"
HELDOUT_INTRO = ("The distillation loss on held-out real batches, with fresh models not used in distillation "
                 "(one measurement each, no interval):")


def heldout_summary(check: dict) -> tuple[list[tuple[str, float]], list[str]]:
    """The held-out check's table rows (``(set names, loss)``) and sentences. Each distinct number is
    shown once: keys holding the same value are one row, so no number appears as a copy of another."""
    values = {k: float(v) for k, v in check.items() if k != "note" and isinstance(v, (int, float))}
    if not values:
        return [], []
    rows: dict[float, list[str]] = {}
    for key, value in values.items():
        rows.setdefault(value, []).append(HELDOUT_LABELS.get(key, key))
    sentences = []
    if "distilled" in values and "init" in values and values["init"] > 0:
        d, i = values["distilled"], values["init"]
        sentences.append(f"The distilled set's held-out loss is {'lower' if d < i else 'not lower'} than its initial "
                         f"set's ({d / i:.1%} of it).")
    if "distilled" in values and "other_random_subset" in values and values["other_random_subset"] > 0:
        d, o = values["distilled"], values["other_random_subset"]
        sentences.append(f"Against an independent random subset it is {'lower' if d < o else 'not lower'} "
                         f"({d / o:.1%} of it).")
    if check.get("note"):
        sentences.append(str(check["note"]))
    return [(" = ".join(names), value) for value, names in rows.items()], sentences


def heldout_markdown(check: dict) -> str:
    """The distillation objective on held-out real batches (:func:`heldout_summary`) as Markdown."""
    rows, sentences = heldout_summary(check)
    if not rows:
        return ""
    lines = [f"## {HELDOUT_TITLE}", "", HELDOUT_INTRO, "", "| set | held-out loss |", "|---|---|"]
    lines += [f"| {names} | {value:.5g} |" for names, value in rows]
    return "\n".join(lines + [""] + sentences) + "\n"


def read_heldout_check(out: Path) -> dict | None:
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


def image_grid(path: Path, top: torch.Tensor, bottom: torch.Tensor, count: int = 20,
               labels: tuple[str, str] = ("distilled", "initial")) -> None:
    """Images in [0, 1] (N,C,H,W): ``top`` in the first row and ``bottom`` below it, column by column, so
    each distilled image stands above the real image it started from."""
    plt = _pyplot()
    count = min(count, len(top), len(bottom))
    fig, axes = plt.subplots(2, count, figsize=(count * 0.8, 2.0), squeeze=False)
    for row, (imgs, label) in enumerate(((top[:count].permute(0, 2, 3, 1).numpy(), labels[0]),
                                         (bottom[:count].permute(0, 2, 3, 1).numpy(), labels[1]))):
        for i in range(count):
            ax = axes[row, i]
            ax.imshow(imgs[i].squeeze(-1) if imgs.shape[-1] == 1 else imgs[i], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        axes[row, 0].set_ylabel(label, fontsize=7)
    _save_png(fig, path)
    plt.close(fig)


def differences_plot(path: Path, summary: dict) -> bool:
    """Every tested paired difference of :func:`results_summary` with its 95 % interval, one panel per
    baseline (red: the interval excludes zero). False, and no file, when nothing was tested."""
    tested = [p for p in summary["pairs"] if p["status"] == "tested"]
    panels = [(b, [p for p in tested if p["baseline"] == b]) for b in summary["present"]]
    panels = [(b, pairs) for b, pairs in panels if pairs]
    if not panels:
        return False
    plt = _pyplot()
    several_archs = len({p["key"][1] for p in tested}) > 1
    sizes = [len(pairs) for _, pairs in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 0.9 * len(panels) + 0.24 * sum(sizes)), squeeze=False,
                             gridspec_kw={"height_ratios": sizes})
    for ax, (b, pairs) in zip(axes[:, 0], panels):
        ys = np.arange(len(pairs))[::-1]
        for y, p in zip(ys, pairs):
            mean, lo, hi = 100 * p["mean"], 100 * p["lo"], 100 * p["hi"]
            ax.errorbar([mean], [y], xerr=[[mean - lo], [hi - mean]], fmt="o", ms=3, capsize=2,
                        color="C3" if p["beyond_noise"] else "C0")
        ax.axvline(0, color="k", lw=0.8)
        names = [f"{p['method']} · {p['key'][0]}{' ' + p['key'][1] if several_archs else ''} · {p['key'][2]} "
                 f"{fmt_fraction(p['key'][3])}" for p in pairs]
        ax.set_yticks(ys, names, fontsize=7)
        ax.set_ylim(-0.7, len(pairs) - 0.3)
        ax.set_title(f"method − {b}", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("difference (accuracy points)", fontsize=8)
    fig.suptitle("paired differences, 95 % t-interval over seeds (red: the interval excludes 0)", fontsize=9)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return True


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


@dataclass
class Figure:
    """A picture of the report: its file in ``figures/`` and the caption both pages show."""

    name: str
    caption: str


GRID_COUNT = 20  # images per grid
SAME_PIXELS = 1e-5  # a set within this of its start (in [0, 1]) is its start: float rounding of the image space


def _source_rows(source: Path, index: list[int]) -> torch.Tensor | None:
    """Rows ``index`` of the prepared source's uint8 images, read lazily (the file may be large); None when
    the file is unreadable or an index is out of range."""
    try:
        with safe_open(str(source), framework="pt") as fh:
            images = fh.get_slice("images")
            n = images.get_shape()[0]
            if not all(isinstance(i, int) and 0 <= i < n for i in index):
                return None
            return torch.cat([images[i:i + 1] for i in index])
    except (OSError, SafetensorError, ValueError, KeyError):
        return None


def _start(out: Path, path: Path, images: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """The images a set started from (its first :data:`GRID_COUNT`, [0, 1]) and where they came from,
    or (None, why not). The paired draw's own set (``random_subset``, the same ``init_index``) first: it
    is the start exactly as stored; else the prepared source's images at the set's ``init_index``."""
    index = distilled_set.read_meta(path).get("init_index")
    if not isinstance(index, list) or not index:
        return None, "it records no starting images (init_index)"
    initial = layout.distilled_path(out, "random_subset", 0)
    if initial.is_file() and distilled_set.read_meta(initial).get("init_index") == index and \
            distilled_set.image_shape(initial) == list(images.shape):
        return distilled_set.load(initial).pixels()[:GRID_COUNT], "random_subset"
    source = layout.source_path(out, "train")
    rows = _source_rows(source, index[:GRID_COUNT]) if source.is_file() else None
    if rows is None or list(rows.shape[1:]) != list(images.shape[1:]):
        return None, "its starting images are not in this folder"
    return rows.float() / 255, "source"


def image_grids(out: Path, figures: Path) -> tuple[list[Figure], dict[str, str]]:
    """One grid per first-seed distilled set: its images above the real images it started from. Also,
    per set without a grid, why: sets whose images are their start (selections such as random_ssl or
    kmeans) and sets whose start the folder does not hold."""
    shown, skipped = [], {}
    initial = layout.distilled_path(out, "random_subset", 0)
    for path in layout.first_seed_sets(out):
        method = path.stem
        if path == initial:
            continue  # the paired draw itself: the start of the others
        try:
            x = distilled_set.load(path).pixels()
            x0, origin = _start(out, path, x)
        except UserError:
            skipped[method] = "its file does not load"
            continue
        if x0 is None:
            skipped[method] = origin
            continue
        count = min(GRID_COUNT, len(x), len(x0))
        change = (x[:count] - x0[:count]).abs()
        if float(change.max()) <= SAME_PIXELS:
            skipped[method] = "its images are the real images it starts from: a selection, not optimised"
            continue
        name = "distilled_vs_initial.png" if method == "krr_st" else f"{method}_vs_initial.png"
        image_grid(figures / name, x, x0, count)
        caption = (f"{method}: distilled (top) and the initial real images (bottom)" if origin == "random_subset"
                   else f"{method}: distilled (top) and the source images it started from (bottom, by init_index)")
        shown.append(Figure(name, f"{caption}; mean change {100 * float(change.mean()):.2g} % of the pixel range"))
    return shown, skipped


@dataclass
class ReportContent:
    """Everything the report shows, computed once: ``report.md`` and ``report.html`` both render it."""

    out: Path
    has_results: bool
    summary: dict
    interval_note: str
    heldout: dict | None
    differences: Figure | None
    grids: list[Figure]
    no_grid: dict[str, str]
    curves: list[Figure]
    config: Any


def collect(out: str | Path, methods: Iterable[str] | None = None, interval_note: str = "",
            heldout_check: dict | None = None) -> ReportContent:
    """The report's numbers from the artifacts in ``out``, and its figures written to ``figures/``.
    Arguments as for :func:`write_report`; figures and sections whose inputs are missing are left out."""
    out = Path(out)
    rows = artifacts.read_json(layout.results_paths(out)[0])
    summary = results_summary(rows, methods)
    figures = layout.figures_dir(out)
    differences = Figure("paired_differences.png", "paired differences with their 95 % intervals")
    if not differences_plot(figures / differences.name, summary):
        differences = None
    grids, no_grid = image_grids(out, figures)
    curves_shown = []
    curves = distill_curves(out)
    if curves:
        longest = max(len(c) for c in curves.values())
        curve_plot(figures / "distill_loss.png", curves, "distillation loss (training batches)", "outer step",
                   smooth=max(1, longest // 50))
        curves_shown.append(Figure("distill_loss.png", "distillation loss"))
    pretrain = _read_log(layout.pretrain_log_path(out), "epoch_loss")
    if pretrain:
        curve_plot(figures / "pretrain_loss.png", pretrain, "pre-training loss on the distilled sets", "epoch")
        curves_shown.append(Figure("pretrain_loss.png", "pre-training loss"))
    config = None
    config_path = layout.stage_config_path(out, "evaluate")
    if config_path.is_file():
        try:
            config = artifacts.read_json(config_path).get("config")
        except (UserError, AttributeError):
            config = None
    check = heldout_check if heldout_check is not None else read_heldout_check(out)
    return ReportContent(out, bool(rows), summary, interval_note, check or None, differences, grids, no_grid,
                         curves_shown, config)


def no_grid_text(no_grid: dict[str, str]) -> str:
    """One sentence on the distilled sets shown without their starting images."""
    return "No image grid for " + "; ".join(f"{m} ({why})" for m, why in no_grid.items()) + "."


def report_markdown(content: ReportContent) -> str:
    """``report.md``'s text."""
    parts = [f"# ssdd report: `{content.out}`", "", "## Transfer accuracy", "",
             summary_markdown(content.summary, content.interval_note) if content.has_results else "No results.", ""]
    if content.differences:
        parts += [f"![{content.differences.caption}](figures/{content.differences.name})", ""]
    if content.heldout:
        parts.append(heldout_markdown(content.heldout))
    for fig in content.grids:
        parts += [f"![{fig.caption}](figures/{fig.name})", ""]
    if content.no_grid:
        parts += [no_grid_text(content.no_grid), ""]
    for fig in content.curves:
        parts += [f"![{fig.caption}](figures/{fig.name})", ""]
    if content.config is not None:
        parts += ["## Configuration", "", "```json", json.dumps(content.config, indent=1), "```", ""]
    return "\n".join(parts)


def write_markdown(content: ReportContent) -> Path:
    path = layout.report_path(content.out)
    artifacts.write_bytes(path, report_markdown(content).encode())
    return path


def write_report(out: str | Path, methods: Iterable[str] | None = None, interval_note: str = "",
                 heldout_check: dict | None = None) -> Path:
    """``report.md`` and its figures from the artifacts in ``out``.

    ``methods``: table order (others with results follow in order of appearance). ``interval_note``:
    what varies between seeds, i.e. what the paired intervals cover. ``heldout_check``: the
    distillation's held-out check (``init``, ``distilled``, ``other_random_subset``, ``note``); when
    None it is read from ``distilled/krr_st.safetensors`` metadata.
    Figures and sections whose inputs are missing are left out.
    """
    return write_markdown(collect(out, methods, interval_note, heldout_check))
