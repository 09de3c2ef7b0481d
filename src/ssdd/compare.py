"""Many methods, one table: each method's accuracy per (target, protocol, labels) and its paired
difference to the random real subset (``random_subset``) with a 95 % interval over seeds.

Pure tables and writers; running the stages that produce the results is the caller's job.
Accuracies here are in percent, differences in accuracy points.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ssdd import artifacts
from ssdd.evaluate.stats import capture, excludes_zero, mean_std, paired_interval, paired_values
from ssdd.paper_table import paper_cells, read_paper_table
from ssdd.report import NOT_COMPARED, fmt_fraction, fmt_signed, group_of, method_order

LEVEL = 0.95


def default_group(rows: list[dict]) -> str:
    """The architecture group with the most result rows (ties: the first to appear)."""
    if not rows:
        return ""
    counts = Counter(group_of(r) for r in rows)
    best = max(counts.values())
    return next(g for g in dict.fromkeys(group_of(r) for r in rows) if counts[g] == best)


def column_key(target: str, protocol: str, fraction: float) -> str:
    return f"{target}|{protocol}|{float(fraction):g}"


def _columns(rows: list[dict]) -> list[dict]:
    targets = list(dict.fromkeys(r["target"] for r in rows))
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    keys = {(r["target"], r["protocol"], float(r["label_fraction"])) for r in rows}
    ordered = sorted(keys, key=lambda k: (targets.index(k[0]), protocols.index(k[1]), k[2]))
    return [{"key": column_key(*k), "target": k[0], "protocol": k[1], "label_fraction": k[2]} for k in ordered]


def _cell(values: dict[int, float], base: dict[int, float] | None, is_baseline: bool) -> dict:
    seeds = sorted(values)
    mean, std = mean_std([values[s] for s in seeds])
    cell: dict[str, Any] = {"n": len(seeds), "mean": mean, "std": std, "seeds": seeds,
                            "values": [values[s] for s in seeds]}
    if is_baseline:
        reason = "is the baseline"
    elif not seeds:
        reason = "no result"
    elif base is None:
        reason = "no baseline result"
    else:
        paired, a, b = paired_values(values, base)
        if len(paired) >= 2:
            d, lo, hi = paired_interval(a, b, LEVEL)
            cell["diff"] = {"mean": d, "lo": lo, "hi": hi, "n_pairs": len(paired),
                            "beyond_noise": excludes_zero(lo, hi)}
            return cell
        reason = f"{len(paired)} paired seed{'s' * (len(paired) != 1)}"
    cell["diff"] = NOT_COMPARED
    cell["diff_reason"] = reason
    return cell


def compare_table(rows: list[dict], methods: Iterable[str] | None = None, baseline: str = "random_subset",
                  ceiling: str = "full_ssl", storage: dict[str, int] | None = None) -> dict:
    """One table of the default architecture group (:func:`default_group`): per method and column
    (target, protocol, label_fraction) the mean, std, n and per-seed values (percent), and the paired
    difference to ``baseline`` (``{"mean", "lo", "hi", "n_pairs", "beyond_noise"}``, points) or
    ``"not compared"`` with a ``diff_reason``; and ``capture``: the share of ``ceiling``'s lead over the
    baseline that the method recovers (:func:`ssdd.evaluate.stats.capture`, percent), for every method but those two.
    ``storage``: method -> numbers its set stores (:func:`ssdd.distilled_set.stored_numbers`), shown as a column. ``best``: per column the method(s) with the highest mean
    (to the 0.1 point shown; equal means are all best).

    ``methods``: the rows of the table in order (a method without results gets empty cells); None
    takes every method in order of appearance. The baseline is added when it has results.
    """
    group = default_group(rows)
    mine = [r for r in rows if group_of(r) == group]
    order = list(dict.fromkeys(methods)) if methods is not None else method_order(mine)
    if baseline not in order and any(r["method"] == baseline for r in mine):
        order.append(baseline)
    columns = _columns([r for r in mine if r["method"] in order])
    values: dict[str, dict[str, dict[int, float]]] = {m: {c["key"]: {} for c in columns} for m in order}
    recipes: dict[str, dict[str, dict[int, str]]] = {m: {c["key"]: {} for c in columns} for m in order}
    for r in mine:
        if r["method"] in values:
            key = column_key(r["target"], r["protocol"], r["label_fraction"])
            values[r["method"]][key][r["seed"]] = 100.0 * float(r["accuracy"])
            if r.get("recipe"):  # the pre-training recipe of this seed's encoder (pretrain.recipes)
                recipes[r["method"]][key][r["seed"]] = r["recipe"]
    cells = {m: {} for m in order}
    best: dict[str, list[str]] = {}
    for col in columns:
        key = col["key"]
        base = values.get(baseline, {}).get(key) or None
        top_values = values.get(ceiling, {}).get(key) or None
        for m in order:
            cells[m][key] = _cell(values[m][key], base, m == baseline)
            if recipes[m][key]:
                cells[m][key]["recipes"] = [recipes[m][key].get(s) for s in cells[m][key]["seeds"]]
            if m not in (baseline, ceiling) and cells[m][key]["n"]:
                cells[m][key]["capture"] = capture(values[m][key], base, top_values, LEVEL)
        means = {m: round(cells[m][key]["mean"], 1) for m in order if cells[m][key]["n"]}  # ties as displayed
        top = max(means.values()) if means else None
        best[key] = [m for m, v in means.items() if v == top]
    others = sorted({group_of(r) for r in rows} - {group})
    return {"group": group, "other_groups": others, "baseline": baseline, "ceiling": ceiling, "level": LEVEL,
            "storage": {m: n for m, n in (storage or {}).items() if m in order},
            "unit": "accuracy in percent; differences in accuracy points", "methods": order, "columns": columns,
            "cells": cells, "best": best}


# ---- writers ---------------------------------------------------------------------------

def wall_time(value: Any) -> tuple[float | None, str]:
    """Seconds (a number, or a dict of stage -> seconds) -> (total seconds, text)."""
    def minutes(s: float) -> str:
        return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), minutes(float(value))
    if isinstance(value, dict):
        parts = {k: float(v) for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if parts:
            total = sum(parts.values())
            text = " + ".join(f"{k} {minutes(v)}" for k, v in parts.items())
            return total, text + (f" = {minutes(total)}" if len(parts) > 1 else "")
    return None, "–"


def column_label(col: dict) -> str:
    return f"{col['target']} · {col['protocol']} · {fmt_fraction(col['label_fraction'])} labels"


def cell_text(cell: dict, typical_n: int | None = None) -> str:
    """``46.3 ± 3.1 (+0.2 [−1.0, +1.4])``; ``(not compared)`` / ``(baseline)`` where no interval exists."""
    if not cell["n"]:
        return "–"
    text = f"{cell['mean']:.1f} ± {cell['std']:.1f}" if cell["n"] > 1 else f"{cell['mean']:.1f}"
    notes = [] if cell["n"] == typical_n else [f"n={cell['n']}"]
    diff = cell["diff"]
    if isinstance(diff, dict):
        notes.append(f"{fmt_signed(diff['mean'])} [{fmt_signed(diff['lo'])}, {fmt_signed(diff['hi'])}]")
    elif cell.get("diff_reason") == "is the baseline":
        notes.append("baseline")
    else:
        notes.append(NOT_COMPARED)
    capture = cell.get("capture")
    if isinstance(capture, dict):
        bounds = ("unbounded" if not math.isfinite(capture["lo"]) else
                  "[" + ", ".join(f"{x:+.0f}".replace("-", "−") for x in (capture["lo"], capture["hi"])) + "]")
        notes.append(f"capture {capture['mean']:.0f} % {bounds}".replace("-", "−"))
    if cell.get("recipes"):
        notes.append("recipe " + "/".join(str(r) for r in cell["recipes"]))
    return f"{text} ({', '.join(notes)})"


def typical_n(table: dict) -> int | None:
    """The most common number of seeds per cell: cells with it do not repeat their n."""
    cells = table["cells"]
    ns = [cells[m][c["key"]]["n"] for m in table["methods"] for c in table["columns"] if cells[m][c["key"]]["n"]]
    return Counter(ns).most_common(1)[0][0] if ns else None


def compare_markdown(table: dict, paper: dict[str, dict[str, dict]] | None = None, paper_source: str = "",
                     wall_times: dict | None = None, unmatched: list[dict] | None = None,
                     interval_note: str = "") -> str:
    cols, order, cells = table["columns"], table["methods"], table["cells"]
    typical = typical_n(table)
    lines = ["# Method comparison", "",
             f"Architecture group: {table['group'] or '(none)'}"
             + (f" (other groups in the results, not shown: {', '.join(table['other_groups'])})"
                if table["other_groups"] else "") + ".", ""]
    if not cols:
        return "\n".join(lines + ["No results.", ""])
    stored = table.get("storage") or {}
    names = ["method", *(["stored numbers"] if stored else []), *map(column_label, cols),
             *(["wall time"] if wall_times else [])]
    header = "| " + " | ".join(names) + " |"
    lines += [header, "|---|" + "---|" * (len(cols) + bool(stored) + bool(wall_times))]
    paper = paper or {}
    for m in order + [m for m in paper if m not in order]:
        if m in order:
            texts = []
            for c in cols:
                t = cell_text(cells[m][c["key"]], typical)
                texts.append(f"**{t}**" if m in table["best"].get(c["key"], []) and t != "–" else t)
            wall = f" {wall_time((wall_times or {}).get(m))[1]} |" if wall_times else ""
            size = (f" {stored[m]:,} |" if m in stored else " – |") if stored else ""
            lines.append(f"| {m} |{size} " + " | ".join(texts) + " |" + wall)
        if m in paper:
            texts = [(f"_{paper[m][c['key']]['accuracy']:.1f}_" if c["key"] in paper[m] else "–") for c in cols]
            lines.append(f"| _{m} (paper)_ |" + (" – |" if stored else "") + " " + " | ".join(texts) + " |"
                         + (" – |" if wall_times else ""))
    lines += [""] + compare_notes(table, paper, paper_source, wall_times, unmatched, interval_note)
    return "\n".join(lines) + "\n"


def compare_notes(table: dict, paper: dict | None = None, paper_source: str = "", wall_times: dict | None = None,
                  unmatched: list[dict] | None = None, interval_note: str = "") -> list[str]:
    """The sentences under the table (Markdown inline marks: ``**bold**``, ``_(paper)_``): what a cell
    holds, what capture is, where published rows come from."""
    order, cols, cells, base = table["methods"], table["columns"], table["cells"], table["baseline"]
    typical, stored = typical_n(table), table.get("storage") or {}
    level = f"{100 * table['level']:g} %"
    covers = interval_note.strip().rstrip(".") or \
        "same seed number = same label draw and, for distilled sets, the same initial draw"
    seeds = f" (n={typical} seeds unless a cell says otherwise)" if typical else ""
    lines = [f"Cells: test accuracy (%) as mean ± std over seeds{seeds}; in parentheses the mean paired "
             f"difference to {base} in accuracy points and its {level} Student-t interval over the paired seeds "
             f"({covers}). An interval that excludes 0 is a difference beyond seed noise; \"{NOT_COMPARED}\" means "
             f"fewer than two paired seeds or no {base} result. **Bold**: the highest mean in the column (a "
             "ranking, not a test)."]
    if any(isinstance(cells[m][c["key"]].get("capture"), dict) for m in order for c in cols):
        lines.append(f"Capture: (method − {base}) / ({table['ceiling']} − {base}) in %, the share of the "
                     f"{table['ceiling']} lead over {base} that the method recovers, from means over the seeds all "
                     f"three share, with Fieller's {level} interval for a ratio of paired means (\"unbounded\" when "
                     f"{table['ceiling']}'s lead is itself within seed noise).")
    if paper:
        lines.append(f"Rows marked _(paper)_ are published numbers from {paper_source or 'a user-given table'}, "
                     "in italics: not measured here, never bold, not part of any comparison.")
    if unmatched:
        one = len(unmatched) == 1
        listed = "; ".join(f"{e['method']} {e['target']} {e['protocol']} {fmt_fraction(e['label_fraction'])}"
                           for e in unmatched[:10]) + ("; …" if len(unmatched) > 10 else "")
        lines.append(f"{len(unmatched)} paper entr{'y' if one else 'ies'} match{'es' if one else ''} no column here "
                     f"and {'is' if one else 'are'} not shown: {listed}.")
    if stored:
        lines.append("Stored numbers: what one set of the method stores (images, targets and a learned lr), "
                     "first seed; – for methods that store no set.")
    if wall_times:
        lines.append("Wall time: as measured by the run for each method (stages as named).")
    return lines


def compare_csv(table: dict, paper: dict | None = None, wall_times: dict | None = None) -> str:
    fields = ["source", "method", "group", "target", "protocol", "label_fraction", "n", "mean", "std", "values",
              "diff_mean", "diff_lo", "diff_hi", "n_pairs", "compared", "not_compared_reason", "best",
              "capture_pct", "capture_lo", "capture_hi", "stored_numbers", "wall_time_s", "recipes"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()

    def num(x: Any) -> str:
        return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4f}"

    for m in table["methods"]:
        wall = wall_time((wall_times or {}).get(m))[0]
        for c in table["columns"]:
            cell = table["cells"][m][c["key"]]
            diff = cell["diff"] if isinstance(cell["diff"], dict) else {}
            capture = cell.get("capture") if isinstance(cell.get("capture"), dict) else {}
            writer.writerow({"source": "ours", "method": m, "group": table["group"], "target": c["target"],
                             "protocol": c["protocol"], "label_fraction": f"{c['label_fraction']:g}", "n": cell["n"],
                             "mean": num(cell["mean"]), "std": num(cell["std"]),
                             "values": ";".join(f"{v:.4f}" for v in cell["values"]),
                             "diff_mean": num(diff.get("mean")), "diff_lo": num(diff.get("lo")),
                             "diff_hi": num(diff.get("hi")), "n_pairs": diff.get("n_pairs", ""),
                             "compared": "yes" if diff else "no", "not_compared_reason": cell.get("diff_reason", ""),
                             "best": "yes" if m in table["best"].get(c["key"], []) and cell["n"] else "no",
                             "capture_pct": num(capture.get("mean")), "capture_lo": num(capture.get("lo")),
                             "capture_hi": num(capture.get("hi")),
                             "stored_numbers": (table.get("storage") or {}).get(m, ""), "wall_time_s": num(wall),
                             "recipes": ";".join(str(r) for r in cell.get("recipes") or [])})
    for m, by_key in (paper or {}).items():
        for c in table["columns"]:
            if c["key"] in by_key:
                writer.writerow({"source": "paper", "method": m, "group": "", "target": c["target"],
                                 "protocol": c["protocol"], "label_fraction": f"{c['label_fraction']:g}",
                                 "n": by_key[c["key"]]["n"], "mean": num(by_key[c["key"]]["accuracy"]),
                                 "compared": "no", "not_compared_reason": "published number", "best": "no"})
    return buf.getvalue()


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> None, tuples -> lists, numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def compare_figure(path: Path, table: dict) -> None:
    """Per column, each method's paired difference to the baseline with its interval; a zero line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols, base = table["columns"], table["baseline"]
    others = [m for m in table["methods"] if m != base]
    per_row = min(4, max(1, len(cols)))
    nrows = max(1, math.ceil(len(cols) / per_row))
    fig, axes = plt.subplots(nrows, per_row, figsize=(3.2 * per_row, 2.8 * nrows), squeeze=False)
    for ax in axes.flat[len(cols):]:
        ax.axis("off")
    for ax, col in zip(axes.flat, cols):
        ax.axhline(0, color="k", lw=0.8)
        for i, m in enumerate(others):
            cell = table["cells"][m][col["key"]]
            diff = cell["diff"]
            if not cell["n"]:
                continue  # no result: nothing to draw
            if isinstance(diff, dict):
                ax.errorbar([i], [diff["mean"]], yerr=[[diff["mean"] - diff["lo"]], [diff["hi"] - diff["mean"]]],
                            fmt="o", color="C3" if diff["beyond_noise"] else "C0", capsize=3)
                if isinstance(cell.get("capture"), dict):
                    ax.annotate(f"{cell['capture']['mean']:.0f} %", (i, diff["mean"]), fontsize=6, color="0.3",
                                xytext=(4, 0), textcoords="offset points", va="center")
            else:
                ax.plot([i], [0], marker="x", color="0.6")
                ax.annotate(NOT_COMPARED, (i, 0), fontsize=6, color="0.4", rotation=90, ha="center", va="bottom",
                            xytext=(0, 4), textcoords="offset points")
        ax.set_xticks(range(len(others)), others, rotation=45, ha="right", fontsize=7)
        ax.set_xlim(-0.6, max(len(others), 1) - 0.4)
        ax.set_title(column_label(col), fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for row in axes:
        row[0].set_ylabel(f"method − {base} (points)", fontsize=7)
    if not cols:
        axes[0, 0].text(0.5, 0.5, "no results", ha="center", va="center")
    fig.suptitle(f"paired difference to {base}, {100 * table['level']:g} % t-interval over seeds "
                 f"({table['group']}; red: the interval excludes 0; labels: capture of the "
                 f"{table.get('ceiling', 'full_ssl')} lead)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    artifacts.write_bytes(path, buf.getvalue())


def comparison(rows: list[dict], methods: Iterable[str] | None = None, baseline: str = "random_subset",
               paper_table: str | Path | None = None, storage: dict[str, int] | None = None) -> dict:
    """The comparison's numbers, computed once (``compare.md``/``.csv``/``.json`` and ``compare.html`` all
    render it): ``table`` (:func:`compare_table`), ``paper`` and ``unmatched`` (the published numbers of
    ``paper_table`` matched to its columns) and ``paper_source``. A bad paper table fails here, before any
    file is written."""
    entries = read_paper_table(paper_table) if paper_table is not None else []
    table = compare_table(rows, methods, baseline, storage=storage)
    paper, unmatched = paper_cells(entries, table) if entries else ({}, [])
    return {"table": table, "paper": paper, "unmatched": unmatched, "paper_source": str(paper_table or "")}


def write_compare_files(out_dir: str | Path, comp: dict, wall_times: dict | None = None,
                        interval_note: str = "") -> Path:
    """``compare.md``, ``compare.csv``, ``compare.json`` and ``compare.png`` of a :func:`comparison` in
    ``out_dir``; returns the Markdown file."""
    out_dir, table, paper = Path(out_dir), comp["table"], comp["paper"]
    md = compare_markdown(table, paper, comp["paper_source"], wall_times, comp["unmatched"], interval_note)
    artifacts.write_bytes(out_dir / "compare.csv", compare_csv(table, paper, wall_times).encode())
    artifacts.write_json(out_dir / "compare.json", _clean({
        **table, "paper": {"source": comp["paper_source"] or None, "cells": paper, "unmatched": comp["unmatched"]},
        "wall_times": wall_times or {}}))
    compare_figure(out_dir / "compare.png", table)
    path = out_dir / "compare.md"
    artifacts.write_bytes(path, md.encode())
    return path


def write_compare(out_dir: str | Path, rows: list[dict], methods: Iterable[str] | None = None,
                  baseline: str = "random_subset", paper_table: str | Path | None = None,
                  wall_times: dict | None = None, interval_note: str = "", storage: dict[str, int] | None = None) -> Path:
    """``compare.md``, ``compare.csv``, ``compare.json`` and ``compare.png`` in ``out_dir``; returns
    the Markdown file. ``paper_table``: published numbers shown as marked extra rows (never bold);
    ``wall_times``: method -> seconds, or method -> {stage: seconds}; ``interval_note``: what varies
    between seeds (what the intervals cover)."""
    return write_compare_files(out_dir, comparison(rows, methods, baseline, paper_table, storage), wall_times,
                               interval_note)


# ---- orchestration: `ssdd compare` --------------------------------------------------------
