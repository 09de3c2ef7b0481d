"""The approximation network: view targets stored as shifts predicted from the base target.

Boost-SSL-DD stores, instead of a target per view, one small MLP per view that maps an image's base target
to the shift of that view's target (``view_target ≈ base + mlp_v(base)``). The MLPs are fitted once, after
distillation, to the view targets the method made; the set then stores their weights, and every reader
rebuilds the view targets from them. With few images the weights can cost more numbers than the targets
they replace: :func:`ssdd.distilled_set.stored_numbers` counts whichever the set holds.

The weights of all K-1 views are stacked (``w1`` (V, h, d), ``b1`` (V, h), ``w2`` (V, d, h), ``b2`` (V, d))
and saved as the set's tensors ``view_net.w1`` ... (:data:`KEYS`).
"""

from __future__ import annotations

import torch

KEYS = ("w1", "b1", "w2", "b2")
PREFIX = "view_net."


def predict(net: dict[str, torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """The view targets (N, V, d) the network gives for base targets ``base`` (N, d)."""
    hidden = torch.relu(torch.einsum("vhd,nd->nvh", net["w1"], base) + net["b1"])
    return base.unsqueeze(1) + torch.einsum("vdh,nvh->nvd", net["w2"], hidden) + net["b2"]


def fit(base: torch.Tensor, view_targets: torch.Tensor, hidden: int, steps: int = 2000, lr: float = 1e-2,
        seed: int = 0) -> tuple[dict[str, torch.Tensor], float]:
    """Fit one MLP per view to ``view_targets`` (N, V, d) from ``base`` (N, d) by full-batch Adam.

    Returns the weights and the fitting error: the root mean squared difference between the predicted
    and the given view targets (what a reader of the set loses against storing the targets)."""
    n, v, d = view_targets.shape
    base, view_targets = base.detach().float(), view_targets.detach().float()
    gen = torch.Generator().manual_seed(seed)
    scale1, scale2 = d ** -0.5, hidden ** -0.5
    net = {"w1": torch.randn(v, hidden, d, generator=gen) * scale1, "b1": torch.zeros(v, hidden),
           "w2": torch.randn(v, d, hidden, generator=gen) * scale2 * 0.1, "b2": torch.zeros(v, d)}
    net = {k: t.to(base.device).requires_grad_(True) for k, t in net.items()}
    opt = torch.optim.Adam(net.values(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.enable_grad():
        for _ in range(steps):
            loss = (predict(net, base) - view_targets).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net = {k: t.detach() for k, t in net.items()}
    return net, error(net, base, view_targets)


def error(net: dict[str, torch.Tensor], base: torch.Tensor, view_targets: torch.Tensor) -> float:
    """Root mean squared difference between the network's view targets and ``view_targets``."""
    with torch.no_grad():
        return float((predict(net, base.float()) - view_targets.float()).pow(2).mean().sqrt())


def to_tensors(net: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights as a set's tensors (``view_net.w1`` ...)."""
    return {PREFIX + k: net[k].float().cpu() for k in KEYS}


def from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The weights among a set's tensors, or None when it holds no network."""
    if not any(name.startswith(PREFIX) for name in tensors):
        return None
    return {k: tensors[PREFIX + k] for k in KEYS}
