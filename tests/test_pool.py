"""The pool's re-initialisation rule, corrected (default) and as in the reference code."""

import pytest
import torch

from ssdd.distill.engines.pool import ModelPool

SPEC = {"arch": "convnet", "in_channels": 1, "image_size": 8, "out_dim": 2, "widths": [2], "pool": "gap"}


def make_pool(reset):
    pool = ModelPool(SPEC, size=1, max_age=3, reset=reset, seed=0)
    pool.add(pool._fresh()[0])
    return pool


@pytest.mark.parametrize("reset", ["fixed", "reference"])
def test_reset_rule(reset):
    pool = make_pool(reset)
    x, y = torch.randn(4, 1, 8, 8), torch.randn(4, 2)
    models = []
    for _ in range(6):
        pool.train_step(0, x, y)
        models.append(pool.models[0])
    distinct = [m is not models[i - 1] for i, m in enumerate(models) if i > 0]
    if reset == "fixed":
        # re-initialised after steps 3 and 6; the age restarts at 0
        assert pool.reinits == 2 and pool.ages == [0]
        assert distinct == [False, True, False, False, True]
    else:
        # the reference: the pick after the model reached age 3 re-initialises it instead of training
        # it, and the counter is never reset, so every later pick re-initialises it again
        assert pool.reinits == 3 and pool.ages == [3]
        assert distinct == [False, False, True, True, True]


def test_populate_ages_are_in_range():
    pool = ModelPool(SPEC, size=5, max_age=10, seed=3)
    pool.populate(torch.randn(4, 1, 8, 8), torch.randn(4, 2))
    assert len(pool.models) == 5 and all(1 <= a < 10 for a in pool.ages)


def test_unknown_reset_mode():
    with pytest.raises(ValueError):
        ModelPool(SPEC, 1, 3, reset="sometimes")


def reference_rule_trace(start_iterations, picks, max_age):
    """The reference code's rule (model_pool.py), written out: per pick, the number of SGD steps the
    picked model has had since its (re-)initialisation when the outer loss sees it."""
    iterations = list(start_iterations)
    trained = list(start_iterations)
    seen = []
    for idx in picks:
        seen.append(trained[idx])
        if iterations[idx] >= max_age:  # update(): reset, no training, counter kept
            trained[idx] = 0
        else:
            iterations[idx] += 1
            trained[idx] += 1
    return seen


def test_reference_mode_ages_seen_by_the_outer_loss_follow_the_reference_rule():
    pool = ModelPool(SPEC, size=3, max_age=5, reset="reference", seed=4)
    x, y = torch.randn(4, 1, 8, 8), torch.randn(4, 2)
    pool.populate(x, y)
    start = list(pool.ages)
    assert start == pool.trained
    picks, seen = [], []
    for _ in range(40):
        idx = pool.pick()
        picks.append(idx)
        seen.append(pool.trained[idx])  # what the outer loss sees
        pool.train_step(idx, x, y)
    assert seen == reference_rule_trace(start, picks, 5)
    assert max(seen) == 5 and seen.count(0) > 0  # the trace reaches max_age and fresh models


def test_fixed_mode_never_shows_a_model_of_max_age():
    pool = ModelPool(SPEC, size=2, max_age=4, reset="fixed", seed=1)
    x, y = torch.randn(4, 1, 8, 8), torch.randn(4, 2)
    pool.populate(x, y)
    seen = []
    for _ in range(30):
        idx = pool.pick()
        seen.append(pool.trained[idx])
        pool.train_step(idx, x, y)
    assert set(seen) <= set(range(4)) and 0 in seen


def test_chunked_pool_step_equals_the_full_step_without_batchnorm():
    """Chunks accumulate the gradient of the mean over the whole set: with a norm that has no batch
    statistics (instance norm) the chunked step equals the full one."""
    spec = {**SPEC, "widths": [3, 4], "norm": "instance"}
    x, y = torch.randn(10, 1, 8, 8), torch.randn(10, 2)
    pools = []
    for chunk in (0, 3):
        torch.manual_seed(0)
        pool = ModelPool(spec, size=1, max_age=10, seed=0, chunk=chunk)
        pool.add(pool._fresh()[0])
        losses = [pool.train_step(0, x, y).item() for _ in range(2)]
        pools.append((pool, losses))
    (a, la), (b, lb) = pools
    assert la == pytest.approx(lb, rel=1e-5)
    for pa, pb in zip(a.models[0].parameters(), b.models[0].parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
