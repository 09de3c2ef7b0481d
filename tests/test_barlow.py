"""Barlow Twins loss against its formula written element by element, plus its invariances."""

import torch

from ssdd.teacher.barlow import barlow_twins_loss


def formula(z1, z2, lam, eps=1e-5):
    n, d = z1.shape
    a = [(z1[:, i] - z1[:, i].mean()) / torch.sqrt(((z1[:, i] - z1[:, i].mean()) ** 2).mean() + eps) for i in range(d)]
    b = [(z2[:, j] - z2[:, j].mean()) / torch.sqrt(((z2[:, j] - z2[:, j].mean()) ** 2).mean() + eps) for j in range(d)]
    total = 0.0
    for i in range(d):
        for j in range(d):
            c = float(sum(a[i][k] * b[j][k] for k in range(n)) / n)
            total += (1 - c) ** 2 if i == j else lam * c ** 2
    return total


def test_matches_formula():
    torch.manual_seed(0)
    z1, z2 = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    assert abs(barlow_twins_loss(z1, z2, 0.3).item() - formula(z1, z2, 0.3)) < 1e-9


def test_invariances():
    torch.manual_seed(1)
    z1, z2 = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 6, dtype=torch.float64)
    base = barlow_twins_loss(z1, z2)
    perm = torch.randperm(16)
    torch.testing.assert_close(barlow_twins_loss(z1[perm], z2[perm]), base)  # batch order
    torch.testing.assert_close(barlow_twins_loss(z2, z1), base)  # symmetric in the views
    torch.testing.assert_close(barlow_twins_loss(3 * z1 + 2, z2), base, rtol=1e-4, atol=1e-4)  # scale/shift (up to eps)


def test_identical_decorrelated_views_give_zero():
    # Columns of an orthogonal matrix scaled: standardised, identical, uncorrelated features.
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    z = q[:, 1:5] - q[:, 1:5].mean(0)
    assert barlow_twins_loss(z, z, 1.0).item() < 1e-3
