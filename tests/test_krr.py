"""Ridge prediction and the KRR-ST loss against closed forms, a slow direct version and finite differences."""

import numpy as np
import torch

from ssdd.distill.engines.krr import krr_st_loss, outer_loss, ridge_predict
from ssdd.models import build


def test_ridge_predict_matches_float64_closed_form():
    rng = np.random.default_rng(0)
    gs, gr, ys = rng.normal(size=(12, 5)), rng.normal(size=(7, 5)), rng.normal(size=(12, 3))
    got = ridge_predict(torch.tensor(gs, dtype=torch.float32), torch.tensor(gr, dtype=torch.float32),
                        torch.tensor(ys, dtype=torch.float32), ridge=1e-3)
    gs1, gr1 = np.hstack([gs, np.ones((12, 1))]), np.hstack([gr, np.ones((7, 1))])
    k_ss = gs1 @ gs1.T
    expected = gr1 @ gs1.T @ np.linalg.inv(k_ss + 1e-3 * np.trace(k_ss) * np.eye(12)) @ ys
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_ridge_with_tiny_lambda_interpolates_its_own_targets():
    """More features than points: with lambda -> 0 the ridge head fits the synthetic targets exactly."""
    g = torch.randn(6, 20, dtype=torch.float64)
    y = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(ridge_predict(g, g, y, ridge=1e-12), y, rtol=1e-6, atol=1e-6)


def slow_loss(gs, gr, ys, tr, ridge):
    """Direct implementation: explicit loops for the kernels, inverse instead of solve."""
    m, n = len(gs), len(gr)
    gs = [list(map(float, row)) + [1.0] for row in gs]
    gr = [list(map(float, row)) + [1.0] for row in gr]
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    k_ss = np.array([[dot(gs[i], gs[j]) for j in range(m)] for i in range(m)])
    k_rs = np.array([[dot(gr[i], gs[j]) for j in range(m)] for i in range(n)])
    lam = ridge * sum(k_ss[i, i] for i in range(m))
    pred = k_rs @ np.linalg.inv(k_ss + lam * np.eye(m)) @ np.asarray(ys, float)
    return float(((pred - np.asarray(tr, float)) ** 2).mean())


def test_loss_matches_slow_direct_implementation():
    torch.manual_seed(0)
    gs, gr, ys, tr = torch.randn(8, 6), torch.randn(10, 6), torch.randn(8, 3), torch.randn(10, 3)
    got = krr_st_loss(gs, gr, ys, tr, ridge=1e-2).item()
    assert abs(got - slow_loss(gs, gr, ys, tr, 1e-2)) < 1e-5 * max(1, abs(got))


def ridge_lambda(g, ridge):
    g1 = torch.cat([g, torch.ones(len(g), 1, dtype=g.dtype)], 1)
    return ridge * torch.trace(g1 @ g1.T)


def test_lambda_is_treated_as_constant():
    """The gradient equals the one with lambda frozen at its value (no d trace / d g_s term)."""
    torch.manual_seed(1)
    gs = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    gr, ys, tr = (torch.randn(6, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64),
                  torch.randn(6, 2, dtype=torch.float64))
    (got,) = torch.autograd.grad(krr_st_loss(gs, gr, ys, tr, ridge=0.1), [gs])
    lam = ridge_lambda(gs.detach(), 0.1)
    (frozen,) = torch.autograd.grad(krr_st_loss(gs, gr, ys, tr, lam=lam), [gs])
    (moving,) = torch.autograd.grad(krr_st_loss(gs, gr, ys, tr, lam=ridge_lambda(gs, 0.1)), [gs])
    torch.testing.assert_close(got, frozen)
    assert not torch.allclose(got, moving)  # the test can tell the two apart


def test_outer_loss_gradients_match_finite_differences():
    """d loss / d images and d loss / d targets through a real network (float64, small sizes),
    against central finite differences of the same loss with lambda held at its value."""
    torch.manual_seed(0)
    model = build({"arch": "convnet", "in_channels": 1, "image_size": 8, "out_dim": 3, "widths": [4, 4],
                   "pool": "gap"}).double().eval()
    x_s = torch.randn(4, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    y_s = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    x_r, t_r = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    ridge = 1e-2
    gx, gy = torch.autograd.grad(outer_loss(model, x_s, y_s, x_r, t_r, ridge), [x_s, y_s])
    with torch.no_grad():
        lam = ridge_lambda(model.features(x_s), ridge)
        g_r = model.features(x_r)

    def fixed_lambda_loss(x, y):
        return krr_st_loss(model.features(x), g_r, y, t_r, lam=lam).item()

    h = 1e-6
    for tensor, grad, is_x in ((x_s, gx, True), (y_s, gy, False)):
        flat = tensor.detach().flatten()
        for i in torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))[:8].tolist():
            plus, minus = flat.clone(), flat.clone()
            plus[i] += h
            minus[i] -= h
            plus, minus = plus.view_as(tensor), minus.view_as(tensor)
            if is_x:
                fd = (fixed_lambda_loss(plus, y_s.detach()) - fixed_lambda_loss(minus, y_s.detach())) / (2 * h)
            else:
                fd = (fixed_lambda_loss(x_s.detach(), plus) - fixed_lambda_loss(x_s.detach(), minus)) / (2 * h)
            assert abs(fd - grad.flatten()[i].item()) < 1e-6 + 1e-4 * abs(fd), (is_x, i, fd, grad.flatten()[i].item())


def test_spd_solve_matches_float64_solve_and_its_gradients():
    """Cholesky solve (with its hand-written backward) against torch.linalg.solve, value and gradients."""
    from ssdd.distill.engines.krr import spd_solve

    torch.manual_seed(3)
    g = torch.randn(9, 5, dtype=torch.float64)
    a = (g @ g.T + 0.1 * torch.eye(9, dtype=torch.float64)).requires_grad_(True)
    b = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 3, dtype=torch.float64)
    ours = spd_solve(a, b)
    ga, gb = torch.autograd.grad((ours * w).sum(), [a, b])
    ref = torch.linalg.solve(a, b)
    ra, rb = torch.autograd.grad((ref * w).sum(), [a, b])
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gb, rb, rtol=1e-9, atol=1e-9)
    # A is symmetric: only the symmetric part of dA is defined by the solve; compare that
    torch.testing.assert_close(ga + ga.T, ra + ra.T, rtol=1e-9, atol=1e-9)
    sym = lambda t: (t + t.T) / 2  # noqa: E731
    assert torch.autograd.gradcheck(lambda aa, bb: spd_solve(sym(aa), bb), (a.detach().clone().requires_grad_(),
                                                                               b.detach().clone().requires_grad_()))


def test_spd_solve_falls_back_to_lu_when_cholesky_fails():
    """An indefinite matrix: Cholesky reports failure; the LU fallback still solves it, gradients too."""
    from ssdd.distill.engines.krr import spd_solve

    a = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64, requires_grad=True)  # eigenvalues 3, -1
    b = torch.tensor([[1.0], [0.0]], dtype=torch.float64, requires_grad=True)
    assert int(torch.linalg.cholesky_ex(a.detach())[1]) != 0
    x = spd_solve(a, b)
    torch.testing.assert_close(x, torch.linalg.solve(a.detach(), b.detach()))
    (gb,) = torch.autograd.grad(x.sum(), [b])
    torch.testing.assert_close(gb, torch.linalg.solve(a.detach().T, torch.ones(2, 1, dtype=torch.float64)))


def test_ridge_in_bf16_autocast_computes_in_float():
    """Inside a bf16 autocast region the kernels and the solve still run in fp32/fp64."""
    torch.manual_seed(0)
    gs, gr, ys, tr = torch.randn(20, 30), torch.randn(15, 30), torch.randn(20, 4), torch.randn(15, 4)
    exact = krr_st_loss(gs, gr, ys, tr, ridge=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = krr_st_loss(gs, gr, ys, tr, ridge=1e-6)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, exact)


def _outer_setup(m=12, n=9, dtype=torch.float64, widths=(4, 6)):
    torch.manual_seed(5)
    model = build({"arch": "convnet", "in_channels": 1, "image_size": 8, "out_dim": 3, "widths": list(widths),
                   "pool": "flatten"}).to(dtype)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        model(torch.randn(16, 1, 8, 8, dtype=dtype))
    x_s = torch.randn(m, 1, 8, 8, dtype=dtype)
    y_s = torch.randn(m, 3, dtype=dtype)
    x_r, t_r = torch.randn(n, 1, 8, 8, dtype=dtype), torch.randn(n, 3, dtype=dtype)
    return model, x_s, y_s, x_r, t_r


def test_fast_outer_gradients_equal_plain_autograd_single_pass_and_chunked():
    """The three-part gradient (features, ridge, backward), in one pass and chunk by chunk (m = 10,000's
    path), equals autograd through the plain loss expression; the pool weights get no gradient."""
    from ssdd.distill.engines.krr import outer_grads

    model, x_s, y_s, x_r, t_r = _outer_setup()
    xs, ys = x_s.clone().requires_grad_(True), y_s.clone().requires_grad_(True)
    ref_loss = outer_loss(model, xs, ys, x_r, t_r, 1e-3)
    ref_x, ref_y = torch.autograd.grad(ref_loss, [xs, ys])
    with torch.no_grad():
        g_r = model.eval().features(x_r)
    for chunk in (0, 5, 12, 100):
        loss, d_x, d_y = outer_grads(model, x_s, y_s, g_r, t_r, 1e-3, chunk=chunk)
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(d_x, ref_x, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(d_y, ref_y, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_bf16_outer_step_stays_close_to_fp32():
    """outer_grads inside bf16 autocast: loss within 1e-2 relative, image and target gradient cosine >= 0.99
    to fp32. The solve's backward must stay fp32 (under the enclosing autocast it ran in bf16: cosines
    0.91 / 0.82 here). The whole bf16 step (teacher and real features in bf16 too) is checked at the
    paper config against the reference code by ``benchmarks/step_speed.py --check``."""
    from ssdd.distill.engines.krr import outer_grads

    torch.manual_seed(5)
    spec = {"arch": "convnet", "in_channels": 3, "image_size": 16, "out_dim": 8, "pool": "flatten"}
    model = build({**spec, "widths": [32, 64]})
    teacher = build({**spec, "widths": [8], "pool": "gap"}).eval()
    model.train()
    with torch.no_grad():
        model(torch.randn(64, 3, 16, 16))
    model.eval()
    x_s, x_r = torch.randn(64, 3, 16, 16), torch.randn(256, 3, 16, 16)
    with torch.no_grad():
        y_s, t_r, g_r = teacher.features(x_s), teacher.features(x_r), model.features(x_r)
    loss, d_x, d_y = outer_grads(model, x_s, y_s, g_r, t_r, 1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, d_x16, d_y16 = outer_grads(model, x_s, y_s, g_r, t_r, 1e-6)
    assert abs(loss16.item() - loss.item()) <= 1e-2 * abs(loss.item())
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()  # noqa: E731
    assert cos(d_x, d_x16) >= 0.99 and cos(d_y, d_y16) >= 0.99, (cos(d_x, d_x16), cos(d_y, d_y16))
