"""Kernel ridge regression on network features: the closed-form inner problem of KRR-ST.

Pure functions: no state, no randomness, so they are tested against closed forms and
finite differences. They always compute in fp32 or wider, also inside a bf16 autocast region.
"""

from __future__ import annotations

import torch

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
