"""``report.html`` and ``compare.html``: the run's report and the method comparison as pages for a browser.

Why self-contained: a run folder gets copied, mailed and archived, and a page that fetches nothing shows the
same everywhere, offline too. So each page is one file: figures inline as PNG data URIs, one inline style
sheet, system fonts, no script. The pages render the very numbers ``report.md`` and ``compare.md`` are
written from (:func:`ssdd.report.collect`, :func:`ssdd.compare.comparison`) and embed the PNG files those
write: nothing is recomputed here, so a page and its Markdown never disagree.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Iterable

from ssdd import artifacts, layout, report
from ssdd.compare import cell_text, column_label, compare_notes, typical_n, wall_time, write_compare_files
from ssdd.report import Figure, ReportContent

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:2em auto;
max-width:72em;padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}h3{font-size:1.05em}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.9em}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:.88em;margin:.6em 0}
th,td{border:1px solid #d0d0d0;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;white-space:nowrap}
td.beyond{background:#fde8e6}td.nc{color:#777}tr.paper td{font-style:italic;color:#555}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}
details pre{background:#f7f7f7;padding:.8em;overflow-x:auto}
.note{color:#555;font-size:.92em}
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _figure(png: bytes, caption: str) -> str:
    return (f'<figure><img src="{data_uri(png)}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _table(header: list[str], rows: Iterable[list[tuple[str, str]]], row_class: Iterable[str] | None = None) -> str:
    """``header``: plain texts; each row: ``(cell HTML, class)`` pairs."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    classes = list(row_class) if row_class is not None else None
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f'<td class="{c}">{v}</td>' if c else f"<td>{v}</td>" for v, c in row)
                    + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _p(text: str, cls: str = "") -> str:
    return f'<p class="{cls}">{_e(text)}</p>' if cls else f"<p>{_e(text)}</p>"


def page(title: str, body: list[str]) -> str:
    """One HTML5 document: inline style, no script, nothing to fetch."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


# ---- report.html ---------------------------------------------------------------------------

def _png(content: ReportContent, fig: Figure) -> bytes:
    return (layout.figures_dir(content.out) / fig.name).read_bytes()


def _results(content: ReportContent) -> list[str]:
    summary = content.summary
    order = summary["methods"]
    out = [_p(f"No results for: {', '.join(summary['absent'])}.")] if summary["absent"] else []
    out += [_p(report.MEANS_INTRO),
            _table(["target", "arch", "protocol", "labels", *order],
                   [[(_e(c), "") for c in report.fmt_setting(s["key"])]
                    + [(_e(report.fmt_mean_std(list(s["values"].get(m, {}).values()))), "num") for m in order]
                    for s in summary["settings"]]),
            "<h3>Paired differences</h3>"]
    if not summary["present"]:
        return out + [_p(report.no_baseline_text(summary["baselines"]))]
    out.append(_p(report.paired_intro(content.interval_note)))
    if summary["missing"]:
        out.append(_p(report.missing_text(summary["missing"])))
    rows = []
    for pair in summary["pairs"]:
        cls = "beyond" if pair.get("beyond_noise") else ("" if pair["status"] == "tested" else "nc")
        cells = report.pair_cells(pair)
        rows.append([(_e(c), "") for c in report.fmt_setting(pair["key"])] + [(_e(cells[0]), "")]
                    + [(_e(c), f"num {cls}".strip()) for c in cells[1:]])
    out.append(_table(["target", "arch", "protocol", "labels", "comparison", "difference", "95 % interval",
                       "pairs"], rows))
    out.append(_p("Shaded: the interval excludes zero; grey: not compared.", "note"))
    if content.differences:
        out.append(_figure(_png(content, content.differences), content.differences.caption))
    said = report.conclusions(summary)
    if not said["tested"]:
        return out + [_p(report.NOTHING_TESTED)]
    if said["beyond"]:
        out += [_p(report.BEYOND_INTRO), "<ul>" + "".join(f"<li>{_e(line)}</li>" for line in said["beyond"]) + "</ul>"]
    else:
        out.append(_p(report.none_beyond_text(said["tested"])))
    return out + [_p(sentence) for sentence in said["within"]]


def report_page(content: ReportContent) -> str:
    """``report.html``'s text: the sections of ``report.md`` in the same order, figures inline."""
    body = [f"<h1>ssdd report: <code>{_e(content.out)}</code></h1>", "<h2>Transfer accuracy</h2>"]
    body += _results(content) if content.has_results else [_p("No results.")]
    if content.heldout:
        rows, sentences = report.heldout_summary(content.heldout)
        if rows:
            body += [f"<h2>{_e(report.HELDOUT_TITLE)}</h2>", _p(report.HELDOUT_INTRO),
                     _table(["set", "held-out loss"], [[(_e(n), ""), (f"{v:.5g}", "num")] for n, v in rows])]
            body += [_p(s) for s in sentences]
    body.append("<h2>Distilled images beside their starting images</h2>")
    if content.grids:
        body.append(_p("Each column: a distilled image (top) above the real image it started from (bottom); the "
                       "first seed's set, first images.", "note"))
    body += [_figure(_png(content, fig), fig.caption) for fig in content.grids]
    if content.no_grid:
        body.append(_p(report.no_grid_text(content.no_grid)))
    if not content.grids and not content.no_grid:
        body.append(_p("No distilled set in this folder."))
    if content.curves:
        body.append("<h2>Loss curves</h2>")
        body += [_figure(_png(content, fig), fig.caption) for fig in content.curves]
    if content.config is not None:
        body += ["<h2>Configuration</h2>",
                 f"<details><summary>the evaluate stage's resolved config (config.evaluate.json)</summary>"
                 f"<pre>{_e(json.dumps(content.config, indent=1))}</pre></details>"]
    return page(f"ssdd report: {content.out}", body)


def write_report_html(content: ReportContent) -> Path:
    path = layout.report_html_path(content.out)
    artifacts.write_bytes(path, report_page(content).encode())
    return path


def write_reports(out: str | Path, methods: Iterable[str] | None = None, interval_note: str = "",
                  heldout_check: dict | None = None) -> Path:
    """``report.md``, ``report.html`` and their figures from the artifacts in ``out`` (arguments as for
    :func:`ssdd.report.write_report`); returns the Markdown file."""
    content = report.collect(out, methods, interval_note, heldout_check)
    path = report.write_markdown(content)
    write_report_html(content)
    return path


# ---- compare.html --------------------------------------------------------------------------

def _inline(text: str) -> str:
    """A note of :func:`ssdd.compare.compare_notes`, escaped, with its two Markdown marks as HTML."""
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", _e(text))
    return text.replace("_(paper)_", "<em>(paper)</em>")


def compare_page(comp: dict, figure: bytes, wall_times: dict | None = None, interval_note: str = "",
                 report_beside: bool = False) -> str:
    """``compare.html``'s text: ``compare.md``'s table and notes, and ``compare.png`` (``figure``) inline."""
    table, paper = comp["table"], comp["paper"] or {}
    cols, order, cells = table["columns"], table["methods"], table["cells"]
    group = (f"Architecture group: {table['group'] or '(none)'}"
             + (f" (other groups in the results, not shown: {', '.join(table['other_groups'])})"
                if table["other_groups"] else "") + ".")
    body = ["<h1>Method comparison</h1>", _p(group)]
    if report_beside:
        body.append('<p class="note">Per-setting tables against every baseline, the distilled images and the loss '
                    'curves of this run: <a href="report.html">report.html</a>, beside this file.</p>')
    if not cols:
        return page("ssdd: method comparison", body + [_p("No results.")])
    stored, typical = table.get("storage") or {}, typical_n(table)
    header = ["method", *(["stored numbers"] if stored else []), *map(column_label, cols),
              *(["wall time"] if wall_times else [])]
    rows, classes = [], []
    for m in order + [m for m in paper if m not in order]:
        if m in order:
            row = [(_e(m), "")] + ([(f"{stored[m]:,}" if m in stored else "–", "num")] if stored else [])
            for c in cols:
                cell = cells[m][c["key"]]
                text = _e(cell_text(cell, typical))
                if m in table["best"].get(c["key"], []) and cell["n"]:
                    text = f"<strong>{text}</strong>"
                diff = cell["diff"]
                row.append((text, "beyond" if isinstance(diff, dict) and diff["beyond_noise"] else ""))
            if wall_times:
                row.append((_e(wall_time(wall_times.get(m))[1]), ""))
            rows.append(row)
            classes.append("")
        if m in paper:
            row = [(_e(f"{m} (paper)"), "")] + ([("–", "num")] if stored else [])
            row += [(f"{paper[m][c['key']]['accuracy']:.1f}" if c["key"] in paper[m] else "–", "num") for c in cols]
            rows.append(row + ([("–", "")] if wall_times else []))
            classes.append("paper")
    body.append(_table(header, rows, classes))
    body.append(_p("Shaded: the paired interval to the baseline excludes zero.", "note"))
    body += [f"<p>{_inline(note)}</p>" for note in compare_notes(table, paper, comp["paper_source"], wall_times,
                                                                  comp["unmatched"], interval_note)]
    body.append(_figure(figure, f"each method's paired difference to {table['baseline']} with its "
                                f"{100 * table['level']:g} % interval, per column (labels: capture)"))
    return page("ssdd: method comparison", body)


def write_compare_html(out_dir: str | Path, comp: dict, wall_times: dict | None = None,
                       interval_note: str = "") -> Path:
    """``compare.html`` beside the ``compare.png`` that :func:`ssdd.compare.write_compare_files` wrote."""
    out_dir = Path(out_dir)
    text = compare_page(comp, (out_dir / "compare.png").read_bytes(), wall_times, interval_note,
                        layout.report_html_path(out_dir).is_file())
    path = layout.compare_html_path(out_dir)
    artifacts.write_bytes(path, text.encode())
    return path


def write_comparison(out_dir: str | Path, comp: dict, wall_times: dict | None = None, interval_note: str = "") -> Path:
    """``compare.md``/``.csv``/``.json``/``.png`` and ``compare.html``; returns the Markdown file."""
    path = write_compare_files(out_dir, comp, wall_times, interval_note)
    write_compare_html(out_dir, comp, wall_times, interval_note)
    return path
