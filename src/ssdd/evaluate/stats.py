"""Summary statistics of result rows: mean ± std over seeds and paired t-intervals.

Seeds are paired across methods: the same seed number means the same label draw (and the same
initial draw of the distilled set), so a method is compared with a baseline through the per-seed
differences, whose spread is usually much smaller than either method's own spread.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1); the std is NaN below two values, the mean NaN for none."""
    x = np.asarray(list(values), float)
    if len(x) == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else float("nan")


def paired_interval(a: Iterable[float], b: Iterable[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of the per-seed differences ``a - b`` and its two-sided Student-t interval over the pairs.

    ``a[i]`` and ``b[i]`` must belong to the same seed. Below two pairs the bounds are NaN (no
    interval from one difference); with no pairs the mean is NaN too. Equal differences on every
    seed give a zero-width interval at their mean.
    """
    d = np.asarray(list(a), float) - np.asarray(list(b), float)
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(d.mean())
    if len(d) < 2:
        return mean, float("nan"), float("nan")
    from scipy import stats  # imported here: scipy.stats costs ~0.5 s at start-up of every stage

    half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return mean, mean - half, mean + half


def paired_values(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[list[int], list[float], list[float]]:
    """The seeds both ``seed -> value`` maps hold, sorted, with their values in that order."""
    seeds = sorted(set(a) & set(b))
    return seeds, [a[s] for s in seeds], [b[s] for s in seeds]


def excludes_zero(lo: float, hi: float) -> bool:
    """True when a finite interval lies entirely above or below zero."""
    return bool(np.isfinite(lo) and np.isfinite(hi) and (lo > 0 or hi < 0))
