"""The run's report: mean ± std tables, paired differences with 95 % intervals, pictures.

The report states only what it compared: a difference is called beyond seed noise only when its
paired 95 % interval excludes zero, a cell with fewer than two paired seeds or no baseline says
"not compared", and nothing is concluded about settings that were not measured. The numbers and figures
are collected once (:func:`collect`); ``report.md`` is written here, ``report.html`` by :mod:`ssdd.report_html`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ssdd import artifacts, distilled_set, layout
from ssdd.errors import UserError
from ssdd.evaluate.stats import excludes_zero, mean_std, paired_interval, paired_values
from ssdd.report_figures import Figure, curve_plot, distill_curves, image_grids, pyplot, read_log, save_png

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


# ---- figures (the rest: ssdd.report_figures) ---------------------------------------------

def differences_plot(path: Path, summary: dict) -> bool:
    """Every tested paired difference of :func:`results_summary` with its 95 % interval, one panel per
    baseline (red: the interval excludes zero). False, and no file, when nothing was tested."""
    tested = [p for p in summary["pairs"] if p["status"] == "tested"]
    panels = [(b, [p for p in tested if p["baseline"] == b]) for b in summary["present"]]
    panels = [(b, pairs) for b, pairs in panels if pairs]
    if not panels:
        return False
    plt = pyplot()
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
    save_png(fig, path)
    plt.close(fig)
    return True


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
    pretrain = read_log(layout.pretrain_log_path(out), "epoch_loss")
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
