"""Ridge prediction and the KRR-ST loss against closed forms, a slow direct version and finite differences."""

import numpy as np
import torch

from ssdd.distill.krr import krr_st_loss, ridge_predict
from ssdd.distill.krr_st import outer_loss
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
