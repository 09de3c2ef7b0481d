"""Kernel ridge regression on network features: the closed-form inner problem of KRR-ST.

Pure functions: no state, no randomness, so they are tested against closed forms and
finite differences.
"""

from __future__ import annotations

import torch


def with_bias(features: torch.Tensor) -> torch.Tensor:
    """Append a column of ones, so the ridge head has a bias."""
    return torch.cat([features, features.new_ones(len(features), 1)], dim=1)


def ridge_predict(g_s: torch.Tensor, g_r: torch.Tensor, y_s: torch.Tensor, ridge: float = 1e-6,
                  solve_dtype: torch.dtype = torch.float64, lam: torch.Tensor | None = None) -> torch.Tensor:
    """Predict targets of real features ``g_r`` from synthetic features ``g_s`` and targets ``y_s``.

    ``P = K_rs (K_ss + lambda I)^-1 Y_s`` with linear kernels on bias-augmented features and
    ``lambda = ridge * trace(K_ss)`` treated as a constant (no gradient through it). The solve
    runs in ``solve_dtype``: float32 loses digits at lambda = 1e-6 trace. ``lam`` fixes lambda
    explicitly (finite-difference tests hold it constant that way).
    """
    gs, gr = with_bias(g_s), with_bias(g_r)
    k_ss = gs @ gs.T
    k_rs = gr @ gs.T
    lam = ridge * torch.trace(k_ss).detach() if lam is None else lam
    eye = torch.eye(len(gs), device=gs.device, dtype=solve_dtype)
    alpha = torch.linalg.solve(k_ss.to(solve_dtype) + lam.to(solve_dtype) * eye, y_s.to(solve_dtype))
    return k_rs @ alpha.to(k_rs.dtype)


def krr_st_loss(g_s: torch.Tensor, g_r: torch.Tensor, y_s: torch.Tensor, t_r: torch.Tensor,
                ridge: float = 1e-6, lam: torch.Tensor | None = None) -> torch.Tensor:
    """KRR-ST outer loss: mean squared error between the ridge prediction and teacher targets."""
    return (ridge_predict(g_s, g_r, y_s, ridge, lam=lam) - t_r).pow(2).mean()
