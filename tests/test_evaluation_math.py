"""The evaluation's statistics, label draws, validation split and linear probe."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from ssdd.config import EvaluateConfig
from ssdd.data import ImageSet, stratified_fraction
from ssdd.errors import UserError
from ssdd.evaluate import suite
from ssdd.evaluate.linear import frozen_features, linear_probe, probe_extractor, select_c
from ssdd.evaluate.stats import excludes_zero, mean_std, paired_interval, paired_values
from ssdd.evaluate.suite import Target, evaluate_encoder, label_index, validation_split
from ssdd.models import build
from ssdd.models.registry import Encoder


# ---- statistics ---------------------------------------------------------------------------

@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_paired_interval_matches_scipy(level):
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.5, 0.05, 7), rng.normal(0.48, 0.05, 7)
    mean, lo, hi = paired_interval(a, b, level)
    d = a - b
    ref = stats.t.interval(level, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert mean == pytest.approx(d.mean()) and (lo, hi) == pytest.approx(ref)
    ci = stats.ttest_rel(a, b).confidence_interval(level)
    assert (lo, hi) == pytest.approx((ci.low, ci.high))


def test_paired_interval_needs_two_pairs():
    mean, lo, hi = paired_interval([0.7], [0.5])
    assert mean == pytest.approx(0.2) and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in paired_interval([], []))
    assert not excludes_zero(lo, hi)


def test_mean_std_and_pairing():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    m, s = mean_std([4.0])
    assert m == 4.0 and math.isnan(s)
    seeds, a, b = paired_values({0: 1.0, 1: 2.0, 3: 5.0}, {1: 0.5, 0: 0.25, 2: 9.0})
    assert seeds == [0, 1] and a == [1.0, 2.0] and b == [0.25, 0.5]


# ---- label draws and the validation split --------------------------------------------------

def _imageset(counts, side=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    images = torch.randint(0, 256, (len(labels), 1, side, side), dtype=torch.uint8, generator=g)
    return ImageSet(images, labels, [f"c{i}" for i in range(len(counts))], "toy")


def test_label_draws_are_stratified_and_disjoint_from_validation():
    train = _imageset([200, 50, 7])
    y = train.labels.numpy()
    pool, val = validation_split(train, 0.1)
    assert not set(pool) & set(val) and len(pool) + len(val) == len(train)
    assert [int((y[val] == c).sum()) for c in range(3)] == [20, 5, 1]  # round(0.1 * n_c) per class
    for fraction in (0.01, 0.05, 0.1, 0.5):
        idx = label_index(train, fraction, seed=3, draw=1, validation=0.1)
        assert not set(idx) & set(val) and len(set(idx)) == len(idx)
        counts = [int((y[idx] == c).sum()) for c in range(3)]
        assert counts == [max(1, round(fraction * n)) for n in (200, 50, 7)]
    assert sorted(label_index(train, 1.0, 0, validation=0.1)) == sorted(pool)


def test_label_draws_depend_on_seed_draw_fraction_only():
    train = _imageset([100, 100])
    a = label_index(train, 0.1, seed=1, draw=0, validation=0.1)
    assert np.array_equal(a, label_index(train, 0.1, seed=1, draw=0, validation=0.1))
    assert not np.array_equal(a, label_index(train, 0.1, seed=2, draw=0, validation=0.1))
    assert not np.array_equal(a, label_index(train, 0.1, seed=1, draw=1, validation=0.1))
    # without a validation split the draw is exactly stratified_fraction with the same generator
    rng = np.random.default_rng([5, 0, int(round(0.1 * 1e6))])
    assert np.array_equal(label_index(train, 0.1, 5), stratified_fraction(train.labels, 0.1, rng).numpy())


def _toy_encoder(seed):
    torch.manual_seed(seed)
    return build({"arch": "convnet", "in_channels": 1, "image_size": 8, "out_dim": 0, "widths": [4], "pool": "gap"})


def test_label_draws_identical_across_methods_and_disjoint_from_val(monkeypatch):
    train, test = _imageset([30, 30, 30], side=8), _imageset([10, 10, 10], side=8, seed=1)
    target = Target("toy", train, test)
    cfg = EvaluateConfig(protocols=["linear"], linear_fractions=[0.1, 1.0], linear_draws=2, validation=0.2,
                         linear_c_grid=[0.1, 1.0])
    seen = []
    real = suite.label_index

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(suite, "label_index", spy)
    rows_a = evaluate_encoder("method_a", 4, _toy_encoder(0), target, cfg)
    draws_a, seen[:] = list(seen), []
    rows_b = evaluate_encoder("method_b", 4, _toy_encoder(1), target, cfg)
    assert len(draws_a) == 3 and all(np.array_equal(x, y) for x, y in zip(draws_a, seen))
    _, val = validation_split(train, 0.2)
    assert all(not set(d) & set(val) for d in draws_a)  # test images are a different set altogether
    assert [(r["protocol"], r["label_fraction"], r["n_labels"]) for r in rows_a] == \
        [(r["protocol"], r["label_fraction"], r["n_labels"]) for r in rows_b]
    for r in rows_a:
        assert r["c"] in (0.1, 1.0) and 0 <= r["accuracy"] <= 1 and 0 <= r["val_accuracy"] <= 1


# ---- the linear probe ----------------------------------------------------------------------

def _separable(n, d=10, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (classes, d))
    y = rng.integers(0, classes, n)
    return centres[y] + rng.normal(0, 0.5, (n, d)), y


def test_linear_probe_separates_a_separable_problem():
    x, y = _separable(300)
    res = linear_probe(x[:150], y[:150], x[200:], y[200:], x[150:200], y[150:200], [0.01, 1.0, 100.0])
    assert res.accuracy == 1.0 and res.val_accuracy == 1.0


def test_c_is_chosen_on_validation_not_test():
    x, y = _separable(400, d=20, classes=4, seed=1)
    x = x + np.random.default_rng(2).normal(0, 8, x.shape)  # overlapping classes: C matters
    tr, va, te = slice(0, 60), slice(60, 200), slice(200, 400)
    grid = [1e-4, 1e-2, 1.0, 100.0]
    honest = linear_probe(x[tr], y[tr], x[te], y[te], x[va], y[va], grid)
    adversarial = linear_probe(x[tr], y[tr], x[te], np.random.default_rng(3).permutation(y[te]), x[va], y[va], grid)
    assert honest.c == adversarial.c
    chosen, accs = select_c(x[tr], y[tr], x[va], y[va], grid)
    assert chosen == honest.c and accs[chosen] == max(accs.values()) and set(accs) == set(grid)
    assert len(set(accs.values())) > 1  # the grid matters on this problem
    assert honest.val_accuracy == accs[chosen]
    # no validation split: C = 1
    assert linear_probe(x[tr], y[tr], x[te], y[te], None, None, grid).c == 1.0


def test_validation_zero_uses_c_one():
    train, test = _imageset([20, 20], side=8), _imageset([5, 5], side=8, seed=1)
    cfg = EvaluateConfig(protocols=["linear"], linear_fractions=[1.0], validation=0.0, linear_c_grid=[0.01, 10.0])
    (row,) = evaluate_encoder("m", 0, _toy_encoder(0), Target("toy", train, test), cfg)
    assert row["c"] == 1.0 and row["val_accuracy"] is None and row["n_labels"] == 40


# ---- probe features ------------------------------------------------------------------------

def test_flatten_features_of_a_gap_convnet():
    enc = build({"arch": "convnet", "in_channels": 1, "image_size": 16, "out_dim": 0, "widths": [4, 8],
                 "pool": "gap"})
    x = torch.randn(3, 1, 16, 16)
    assert probe_extractor(enc, "flatten")(x).shape == (3, 8 * 4 * 4)
    assert probe_extractor(enc, "gap")(x).shape == (3, 8)
    flat = build({"arch": "convnet", "in_channels": 1, "image_size": 16, "out_dim": 0, "widths": [4, 8],
                  "pool": "flatten"})
    assert probe_extractor(flat, "flatten")(x).shape == (3, 8 * 4 * 4)  # already flattened: its features
    from ssdd.data import Normalizer
    feats = frozen_features(enc, torch.zeros(5, 1, 16, 16, dtype=torch.uint8), Normalizer([0.5], [0.5]), "cpu",
                            mode="flatten")
    assert feats.shape == (5, 128)


def test_flatten_refused_for_an_unknown_backbone():
    enc = Encoder(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten()),
                  2, 0)
    with pytest.raises(UserError, match="evaluate.probe_features") as err:
        probe_extractor(enc, "flatten")
    assert "\n" not in str(err.value)
