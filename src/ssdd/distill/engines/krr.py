"""Kernel ridge regression on network features: the closed-form inner problem of KRR-ST, and the
KRR-ST outer loss of one pool model with its gradients (:func:`outer_loss`, :func:`outer_grads`).

Pure functions: no state, no randomness, so they are tested against closed forms and
finite differences. The ridge part always computes in fp32 or wider, also inside a bf16 autocast region.
"""

from __future__ import annotations

import torch

from ssdd.models import Encoder
from ssdd.phases import NO_TIMER, NoTimer, PhaseTimer
from ssdd.precision import full_precision


def with_bias(features: torch.Tensor) -> torch.Tensor:
    """Append a column of ones, so the ridge head has a bias."""
    return torch.cat([features, features.new_ones(len(features), 1)], dim=1)


class SPDSolve(torch.autograd.Function):
    """``A^-1 B`` for a symmetric positive definite ``A``: a Cholesky factorisation, reused in the backward
    pass (``dB = A^-1 dX``, ``dA = -dB X^T``); an LU factorisation when Cholesky fails (numerically
    indefinite ``A``, e.g. a tiny ridge on duplicated features). On a GPU the branch would make the host
    wait for the factorisation every step, so there a failed Cholesky yields NaN instead (fp64 at the
    default ridge never fails: ``K + lambda I`` has eigenvalues of at least lambda)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        factor, info = torch.linalg.cholesky_ex(a)
        if a.device.type != "cpu":  # never wait for the GPU to read ``info``: a failed factorisation gives a
            x = torch.cholesky_solve(b, factor)  # non-finite result, which the loop's loss check reports
            x = torch.where(info == 0, x, torch.full_like(x, float("nan")))
            ctx.kind = "cholesky"
            ctx.save_for_backward(factor, x)
        elif int(info) == 0:
            x = torch.cholesky_solve(b, factor)
            ctx.kind = "cholesky"
            ctx.save_for_backward(factor, x)
        else:
            lu, pivots = torch.linalg.lu_factor(a)
            x = torch.linalg.lu_solve(lu, pivots, b)
            ctx.kind = "lu"
            ctx.save_for_backward(lu, pivots, x)
        return x

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if ctx.kind == "cholesky":
            factor, x = ctx.saved_tensors
            grad_b = torch.cholesky_solve(grad_x, factor)
        else:
            lu, pivots, x = ctx.saved_tensors
            grad_b = torch.linalg.lu_solve(lu, pivots, grad_x, adjoint=True)
        return -grad_b @ x.mT, grad_b


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve ``a x = b`` for symmetric positive definite ``a`` (differentiable in both)."""
    return SPDSolve.apply(a, b)


def ridge_predict(g_s: torch.Tensor, g_r: torch.Tensor, y_s: torch.Tensor, ridge: float = 1e-6,
                  solve_dtype: torch.dtype = torch.float64, lam: torch.Tensor | None = None) -> torch.Tensor:
    """Predict targets of real features ``g_r`` from synthetic features ``g_s`` and targets ``y_s``.

    ``P = K_rs (K_ss + lambda I)^-1 Y_s`` with linear kernels on bias-augmented features and
    ``lambda = ridge * trace(K_ss)`` treated as a constant (no gradient through it). The solve
    runs in ``solve_dtype``: float32 loses digits at lambda = 1e-6 trace. ``lam`` fixes lambda
    explicitly (finite-difference tests hold it constant that way). bf16 features are widened to fp32.
    """
    dtype = torch.promote_types(g_s.dtype, torch.float32)
    with full_precision(g_s.device):
        gs, gr = with_bias(g_s.to(dtype)), with_bias(g_r.to(dtype))
        k_ss = gs @ gs.T
        k_rs = gr @ gs.T
        lam = ridge * torch.trace(k_ss).detach() if lam is None else lam
        eye = torch.eye(len(gs), device=gs.device, dtype=solve_dtype)
        alpha = spd_solve(k_ss.to(solve_dtype) + lam.to(solve_dtype) * eye, y_s.to(solve_dtype))
        return k_rs @ alpha.to(k_rs.dtype)


def krr_st_loss(g_s: torch.Tensor, g_r: torch.Tensor, y_s: torch.Tensor, t_r: torch.Tensor,
                ridge: float = 1e-6, lam: torch.Tensor | None = None) -> torch.Tensor:
    """KRR-ST outer loss: mean squared error between the ridge prediction and teacher targets."""
    pred = ridge_predict(g_s, g_r, y_s, ridge, lam=lam)
    with full_precision(pred.device):
        return (pred - t_r.to(pred.dtype)).pow(2).mean()


def outer_loss(model: Encoder, x_s: torch.Tensor, y_s: torch.Tensor, x_real: torch.Tensor,
               t_real: torch.Tensor, ridge: float) -> torch.Tensor:
    """The KRR-ST loss for one pool model (eval mode: BatchNorm running statistics), as one
    differentiable expression: the plain form, used by checks and as the tests' reference."""
    model.eval()
    g_s = model.features(x_s)
    with torch.no_grad():
        g_r = model.features(x_real)
    return krr_st_loss(g_s, g_r, y_s, t_real, ridge)


def outer_grads(model: Encoder, x_s: torch.Tensor, y_s: torch.Tensor, g_r: torch.Tensor, t_real: torch.Tensor,
                ridge: float, chunk: int = 0, timer: PhaseTimer | NoTimer = NO_TIMER
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The KRR-ST loss and its gradients w.r.t. ``x_s`` and ``y_s``, by the chain rule in three parts:
    synthetic features ``G_s``; the small m x d ridge problem gives ``dL/dG_s`` and ``dL/dY_s``; back
    through the network. The pool model's weights get no gradient.

    One pass (``m <= chunk``): the forward keeps its graph for the backward. Otherwise the features
    are computed without a graph and each chunk is recomputed with its graph for its backward: the
    same gradient (eval mode makes each image's features independent), one extra forward, memory
    bounded by the chunk (m = 10,000 fits in 24 GB). Network passes run in the caller's precision;
    the ridge part, forward and backward, always in fp32/fp64: under bf16 autocast the backward ops
    of the solve would otherwise run in bf16 too, which turned the image-gradient cosine to fp32 from
    0.998 into 0.79 in ``benchmarks/step_speed.py``'s check.
    """
    model.eval()
    device = x_s.device
    x_s = x_s.detach()
    step = chunk if 0 < chunk < len(x_s) else len(x_s)
    one_pass = step == len(x_s)
    with timer("synthetic_forward"):
        if one_pass:
            x_leaf = x_s.requires_grad_(True)
            g_graph = model.features(x_leaf)
            g_s = _wide(g_graph.detach())
        else:
            with torch.no_grad():
                g_s = torch.cat([_wide(model.features(x_s[i:i + step])) for i in range(0, len(x_s), step)])
    with timer("ridge"), full_precision(device):  # backward ops too would follow an enclosing autocast
        g_leaf = g_s.requires_grad_(True)
        y_leaf = y_s.detach().requires_grad_(True)
        loss = krr_st_loss(g_leaf, g_r, y_leaf, t_real, ridge)
        d_g, d_y = torch.autograd.grad(loss, [g_leaf, y_leaf])
    with timer("synthetic_backward"):
        if one_pass:
            (d_x,) = torch.autograd.grad(g_graph, [x_leaf], d_g.to(g_graph.dtype))
        else:
            parts = []
            for i in range(0, len(x_s), step):
                x_c = x_s[i:i + step].detach().requires_grad_(True)
                g_c = model.features(x_c)  # in the caller's precision
                (d_c,) = torch.autograd.grad(g_c, [x_c], d_g[i:i + step].to(g_c.dtype))
                parts.append(d_c)
            d_x = torch.cat(parts)
    return loss.detach(), d_x.to(x_s.dtype), d_y


def _wide(t: torch.Tensor) -> torch.Tensor:
    """bf16 -> fp32; fp32 and fp64 unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
