"""Summary statistics of result rows: mean ± std over seeds, paired t-intervals, and capture (a ratio of paired means).

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


def fieller_ratio(num: Iterable[float], den: Iterable[float], level: float = 0.95) -> tuple[float, float, float]:
    """``mean(num) / mean(den)`` of two series paired by seed, with Fieller's interval for a ratio of means.

    Used for capture, (method - baseline) / (ceiling - baseline): both series are per-seed differences from
    the same baseline, so they are correlated, and Fieller's interval takes the covariance into account
    (with a Student-t quantile over the pairs). When the denominator's mean is itself not beyond noise at this
    level, the set of plausible ratios is unbounded: the bounds are then -inf and +inf. Below two pairs the
    bounds are NaN."""
    a, b = np.asarray(list(num), float), np.asarray(list(den), float)
    n = len(a)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    ma, mb = float(a.mean()), float(b.mean())
    ratio = ma / mb if mb != 0 else float("nan")
    if n < 2:
        return ratio, float("nan"), float("nan")
    from scipy import stats

    t2 = float(stats.t.ppf(0.5 + level / 2, n - 1)) ** 2
    cov = np.cov(a, b, ddof=1) / n  # covariance of the two means
    qa, qb, qab = mb * mb - t2 * cov[1, 1], ma * mb - t2 * cov[0, 1], ma * ma - t2 * cov[0, 0]
    disc = qb * qb - qa * qab
    if qa <= 0 or disc < 0:
        return ratio, float("-inf"), float("inf")
    root = math.sqrt(disc)
    return ratio, float((qb - root) / qa), float((qb + root) / qa)


def capture(values: Mapping[int, float], base: Mapping[int, float] | None, ceiling: Mapping[int, float] | None,
            level: float = 0.95) -> dict | str:
    """(method - baseline) / (ceiling - baseline) in percent over the seeds all three share, with Fieller's
    interval (:func:`fieller_ratio`), or why there is none. Each map: seed -> accuracy."""
    if not base or not ceiling:
        return "no baseline or ceiling result"
    seeds = sorted(set(values) & set(base) & set(ceiling))
    if len(seeds) < 2:
        return f"{len(seeds)} seed{'s' * (len(seeds) != 1)} shared with baseline and ceiling"
    ratio, lo, hi = fieller_ratio([values[s] - base[s] for s in seeds], [ceiling[s] - base[s] for s in seeds], level)
    return {"mean": 100 * ratio, "lo": 100 * lo, "hi": 100 * hi, "n_pairs": len(seeds)}
