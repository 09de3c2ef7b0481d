"""ssdd's MKDT equals the authors' code (benchmarks/mkdt_equivalence.py), when their checkout is at hand.

Runs only with ``MKDT_OFFICIAL_DIR`` pointing at a checkout of sjoshi804/mkdt-data-distill-ssl; skips
with that reason otherwise (the checkout is never copied into this project)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

OFFICIAL = os.environ.get("MKDT_OFFICIAL_DIR", "")
pytestmark = pytest.mark.skipif(
    not (OFFICIAL and (Path(OFFICIAL) / "src" / "mkdt" / "distill.py").is_file()),
    reason="MKDT_OFFICIAL_DIR is not set to a checkout of the authors' MKDT code (sjoshi804/mkdt-data-distill-ssl)")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    module = _load("mkdt_equivalence")
    off = module.mkdt_official.Official(OFFICIAL)
    yield module, off
    module.mkdt_official.unstub(off.stubbed)


def test_matching_loss_and_gradients_equal_the_authors_code(bench):
    me, off = bench
    me.check_architectures(off)
    result = me.matching(off)
    assert all(case["same_minibatches"] for case in result["cases"].values())
    assert result["max_rel_err_float64"] < 1e-10
    assert result["max_rel_err_float32"] < 1e-5


def test_ssdd_default_batch_order_is_the_deliberate_difference(bench):
    """With a remainder (m = 12, batch 5) ssdd's own order uses other minibatches than the authors' code."""
    me, off = bench
    model_name, widths, m, batch_syn, steps, d = me.CASES["convnet_w32_minibatch"]
    prob = me.problem(widths, m, d)
    theirs, _ = me.official_matching(off, model_name, prob, steps, batch_syn, 7, torch.float64)
    ours = me.ssdd_matching(widths, prob, steps, batch_syn, 7, torch.float64)
    assert max(me.rel(a, b) for a, b in zip(ours, theirs)) < 1e-10
    chunks_model = me.build(me.student_spec(widths, d)).double()
    x, y, lr = (prob[k].clone().requires_grad_(True) for k in ("images", "targets", "lr"))
    theta_n = me.unrolled_params(chunks_model, prob["theta0"], x, y, lr, steps, batch_syn,
                                 torch.Generator().manual_seed(7), order="chunks")
    loss = me.trajectory_matching_loss(theta_n, prob["theta0"], prob["theta_star"])
    grad = torch.autograd.grad(loss, [x])[0]
    assert me.rel(grad, theirs[1]) > 1e-3


def test_one_expert_epoch_and_the_high_loss_scores_match(bench):
    me, off = bench
    out = me.experts(off)
    assert out["expert_epoch_rel_err_float32"] < 1e-5  # fp32: channels-last (ssdd) vs NCHW (theirs)
    assert out["expert_epoch_update_rel_err_float32"] < 1e-3
    assert out["high_loss_scores_rel_err_float32"] < 1e-4
    assert out["high_loss_same_top_m"] and out["high_loss_boundary_gap"] > 10 * out["high_loss_score_max_abs_diff"]
