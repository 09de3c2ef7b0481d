"""Self-supervised heads and objectives shared by teacher training and the naive-bilevel baseline:
the Barlow Twins projector and loss (Zbontar et al., 2021), as a module factory and a pure function.
They live with the networks so that distillation can use them without depending on teacher training."""

from __future__ import annotations

import torch
from torch import nn

from ssdd.precision import full_precision


def standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-dimension standardisation over the batch, as BatchNorm1d(affine=False) in training mode."""
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, redundancy_weight: float = 5e-3) -> torch.Tensor:
    """sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2, C the cross-correlation of the standardised views."""
    n = len(z1)
    with full_precision(z1.device):  # fp32 even inside a bf16 autocast region
        dtype = torch.promote_types(z1.dtype, torch.float32)
        c = standardize(z1.to(dtype)).T @ standardize(z2.to(dtype)) / n
        diag = torch.diagonal(c)
        on_diag = (diag - 1).pow(2).sum()
        off_diag = c.pow(2).sum() - diag.pow(2).sum()
        return on_diag + redundancy_weight * off_diag


def projector(in_dim: int, dims: list[int]) -> nn.Sequential:
    """The Barlow Twins projector: Linear-BN-ReLU blocks, last layer a plain Linear."""
    layers: list[nn.Module] = []
    for i, dim in enumerate(dims):
        layers.append(nn.Linear(in_dim, dim, bias=False))
        if i < len(dims) - 1:
            layers += [nn.BatchNorm1d(dim), nn.ReLU(inplace=True)]
        in_dim = dim
    return nn.Sequential(*layers)
