"""benchmarks/schedule_curve.py: each folder's method becomes one budget row, the shared rows come once, a
series brings its own random_subset, and shared rows that differ between folders are reported."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def curve():
    sys.path.insert(0, str(BENCH))
    try:
        import schedule_curve
    finally:
        sys.path.remove(str(BENCH))
    return schedule_curve


def _folder(tmp_path, name, accuracies):
    folder = tmp_path / name
    folder.mkdir()
    rows = [{"method": method, "target": "t", "protocol": "linear", "label_fraction": 0.01, "seed": seed,
             "accuracy": acc, "group": "convnet"}
            for method, values in accuracies.items() for seed, acc in enumerate(values)]
    (folder / "results.json").write_text(json.dumps(rows))
    return folder


def test_budgets_become_rows_beside_one_baseline(curve, tmp_path):
    short = _folder(tmp_path, "a", {"random_subset": [10, 11, 12], "krr_st": [11, 12, 13], "full_ssl": [20, 21, 22]})
    long = _folder(tmp_path, "b", {"random_subset": [10, 11, 12], "krr_st": [12, 14, 15], "full_ssl": [20, 21, 22]})
    views = _folder(tmp_path, "c", {"random_subset": [13, 13, 13], "krr_st": [14, 14, 14], "full_ssl": [20, 21, 22]})
    runs = [curve.parse_run(f"100={short}"), curve.parse_run(f"1000={long}"), curve.parse_run(f"rot:100={views}")]
    rows, warnings = curve.merged_rows("krr_st", runs)
    methods = {r["method"] for r in rows}
    assert methods == {"random_subset", "full_ssl", "krr_st@100", "krr_st@1000", "krr_st+rot@100", "random_subset+rot"}
    assert len(rows) == 6 * 3 and warnings == []
    assert [r["accuracy"] for r in rows if r["method"] == "krr_st@1000"] == [12, 14, 15]


def test_shared_rows_that_differ_are_reported(curve, tmp_path):
    a = _folder(tmp_path, "a", {"random_subset": [10, 11], "krr_st": [11, 12]})
    b = _folder(tmp_path, "b", {"random_subset": [10, 11.5], "krr_st": [12, 14]})
    _, warnings = curve.merged_rows("krr_st", [curve.parse_run(f"1={a}"), curve.parse_run(f"2={b}")])
    assert len(warnings) == 1 and "random_subset" in warnings[0] and "11.5" in warnings[0]


def test_a_run_without_a_budget_is_one_line(curve):
    with pytest.raises(SystemExit, match="expected"):
        curve.parse_run("runs/x")
