"""Capture, (method - random_subset) / (full_ssl - random_subset): Fieller's interval for a ratio of paired
means, and its place in the compare table."""

import math

import pytest

from ssdd.compare import compare_csv, compare_markdown, compare_table
from ssdd.evaluate.stats import capture, fieller_ratio, paired_interval


def test_fieller_with_a_constant_denominator_is_the_t_interval_scaled():
    """Without spread in the denominator, the ratio's interval is the numerator's t-interval over b."""
    num, b = [1.0, 3.0, 2.5, 0.5], 4.0
    ratio, lo, hi = fieller_ratio(num, [b] * 4)
    mean, tlo, thi = paired_interval(num, [0.0] * 4)
    assert ratio == pytest.approx(mean / b) and lo == pytest.approx(tlo / b) and hi == pytest.approx(thi / b)


def test_fieller_is_unbounded_when_the_denominator_is_within_noise_and_nan_below_two_pairs():
    assert fieller_ratio([1.0, 2.0, 3.0], [0.1, -0.2, 0.15])[1:] == (-math.inf, math.inf)
    ratio, lo, hi = fieller_ratio([1.0], [2.0])
    assert ratio == 0.5 and math.isnan(lo) and math.isnan(hi)


def test_fieller_interval_holds_the_ratio_and_covers_it_at_the_right_rate():
    """A ratio of 0.25 with correlated noise: the 95 % interval covers it in about 95 % of 400 draws."""
    import numpy as np

    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(400):
        base = rng.normal(0, 1, 5)
        den = 10 + base + rng.normal(0, 1, 5)
        num = 2.5 + 0.5 * base + rng.normal(0, 1, 5)
        ratio, lo, hi = fieller_ratio(num, den)
        assert lo <= ratio <= hi
        hits += lo <= 0.25 <= hi
    assert 0.90 <= hits / 400 <= 0.99


def rows_for(acc: dict[str, list[float]]) -> list[dict]:
    return [{"method": m, "seed": s, "target": "digits", "protocol": "linear", "label_fraction": 0.01,
             "accuracy": a / 100, "group": "convnet", "arch": "convnet"} for m, v in acc.items() for s, a in enumerate(v)]


def test_compare_gives_capture_for_every_method_but_baseline_and_ceiling():
    acc = {"krr_st": [42, 43, 43.5], "random_subset": [40, 42, 41], "no_pretrain": [38, 39, 38.5],
           "full_ssl": [50, 51, 50.5]}
    table = compare_table(rows_for(acc), list(acc))
    cells = {m: table["cells"][m]["digits|linear|0.01"] for m in acc}
    expected = capture(dict(enumerate(acc["krr_st"])), dict(enumerate(acc["random_subset"])),
                       dict(enumerate(acc["full_ssl"])))
    assert cells["krr_st"]["capture"] == expected
    assert expected["mean"] == pytest.approx(100 * (sum(acc["krr_st"]) - sum(acc["random_subset"]))
                                             / (sum(acc["full_ssl"]) - sum(acc["random_subset"])))
    assert "capture" not in cells["random_subset"] and "capture" not in cells["full_ssl"]
    assert cells["no_pretrain"]["capture"]["mean"] < 0
    md = compare_markdown(table)
    assert "capture 19 %" in md and "Fieller" in md
    header, first = compare_csv(table).splitlines()[:2]
    assert "capture_pct" in header and "19.2982" in first


def test_capture_says_why_it_is_missing():
    assert capture({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.0}, None) == "no baseline or ceiling result"
    assert capture({0: 1.0}, {0: 0.5}, {0: 3.0}) == "1 seed shared with baseline and ceiling"


def test_storage_column_counts_what_a_set_stores(tmp_path):
    import torch

    from ssdd import distilled_set

    path = tmp_path / "s.safetensors"
    distilled_set.save_arrays(path, torch.zeros(5, 1, 4, 4), torch.zeros(5, 3),
                              {"method": "krr_st", "objective": "mse", "lr": 0.1, "image_space": "reference"})
    assert distilled_set.stored_numbers(path) == 5 * 16 + 5 * 3 + 1
    acc = {"krr_st": [42, 43, 43.5], "random_subset": [40, 42, 41], "full_ssl": [50, 51, 50.5]}
    table = compare_table(rows_for(acc), list(acc), storage={"krr_st": 96, "random_subset": 95})
    md = compare_markdown(table)
    assert "| method | stored numbers |" in md and "| krr_st | 96 |" in md and "| full_ssl | – |" in md
    header, first = compare_csv(table).splitlines()[:2]
    assert dict(zip(header.split(","), first.split(",")))["stored_numbers"] == "96"
