"""The pool's re-initialisation rule, corrected (default) and as in the reference code."""

import pytest
import torch

from ssdd.distill.pool import ModelPool

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
        # the counter is never reset: from step 3 on, every step re-initialises
        assert pool.reinits == 4 and pool.ages == [6]
        assert distinct == [False, True, True, True, True]


def test_populate_ages_are_in_range():
    pool = ModelPool(SPEC, size=5, max_age=10, seed=3)
    pool.populate(torch.randn(4, 1, 8, 8), torch.randn(4, 2))
    assert len(pool.models) == 5 and all(1 <= a < 10 for a in pool.ages)


def test_unknown_reset_mode():
    with pytest.raises(ValueError):
        ModelPool(SPEC, 1, 3, reset="sometimes")
