"""Published numbers the user gives ``ssdd compare --paper-table``: read with one-line errors, placed in the
comparison's columns. Shown beside measured rows, never compared with them."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from ssdd.errors import UserError

PAPER_COLUMNS = ("method", "target", "protocol", "label_fraction", "accuracy")


def _paper_error(path: Path, problem: str) -> UserError:
    return UserError(f"{path}: {problem}; a paper table is a CSV with columns {','.join(PAPER_COLUMNS)} "
                     "(label_fraction in (0, 1], accuracy in percent)")


def read_paper_table(path: str | Path) -> list[dict]:
    """Published numbers: rows ``method, target, protocol, label_fraction, accuracy`` (percent).
    Any problem is one UserError naming the file and the expected columns."""
    path = Path(path)
    if not path.is_file():
        raise _paper_error(path, "file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
        reader = csv.DictReader(io.StringIO(text))
        fields = [f.strip() for f in (reader.fieldnames or [])]
        raw = list(reader)
    except (UnicodeDecodeError, csv.Error, OSError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise _paper_error(path, f"not a readable CSV ({detail})") from None
    missing = [c for c in PAPER_COLUMNS if c not in fields]
    if missing:
        raise _paper_error(path, f"missing column{'s' * (len(missing) > 1)} {', '.join(missing)}")
    if not raw:
        raise _paper_error(path, "no rows")
    entries = []
    for line, rec in enumerate(raw, start=2):
        rec = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else v for k, v in rec.items()}
        for col in ("method", "target", "protocol"):
            if not rec.get(col):
                raise _paper_error(path, f"line {line}: empty {col}")
        try:
            frac, acc = float(rec["label_fraction"]), float(rec["accuracy"])
        except (TypeError, ValueError):
            raise _paper_error(path, f"line {line}: label_fraction {rec['label_fraction']!r} or accuracy "
                                     f"{rec['accuracy']!r} is not a number") from None
        if not (0 < frac <= 1) or not math.isfinite(frac):
            raise _paper_error(path, f"line {line}: label_fraction {frac:g} is not in (0, 1]")
        if not (0 <= acc <= 100) or not math.isfinite(acc):
            raise _paper_error(path, f"line {line}: accuracy {acc:g} is not a percentage in [0, 100]")
        entries.append({"method": rec["method"], "target": rec["target"], "protocol": rec["protocol"],
                        "label_fraction": frac, "accuracy": acc})
    if all(e["accuracy"] <= 1 for e in entries):
        raise _paper_error(path, "every accuracy is at most 1, which looks like fractions, not percent")
    return entries


def paper_cells(entries: list[dict], table: dict) -> tuple[dict[str, dict[str, dict]], list[dict]]:
    """Published entries placed in ``table``'s columns: ``{method: {column key: {"accuracy", "n"}}}``
    (several entries for one cell are averaged) and the entries that match no column."""
    keys = {c["key"]: c for c in table["columns"]}
    by_cell: dict[str, dict[str, list[float]]] = {}
    unmatched = []
    for e in entries:
        key = next((k for k, c in keys.items() if c["target"] == e["target"] and c["protocol"] == e["protocol"]
                    and math.isclose(c["label_fraction"], e["label_fraction"], rel_tol=1e-6)), None)
        if key is None:
            unmatched.append(e)
        else:
            by_cell.setdefault(e["method"], {}).setdefault(key, []).append(e["accuracy"])
    cells = {m: {k: {"accuracy": float(np.mean(v)), "n": len(v)} for k, v in cols.items()}
             for m, cols in by_cell.items()}
    return cells, unmatched
