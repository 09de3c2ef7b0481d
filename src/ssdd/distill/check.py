"""Does distillation optimise what it should? The KRR-ST loss of candidate sets on held-out
real batches, measured with fresh pool-like models that no candidate was trained with."""

from __future__ import annotations

import copy
import random

import torch
from torch import nn

from ssdd.config import DistillConfig
from ssdd.data import ImageSet, Normalizer
from ssdd.data.augment import crop_flip
from ssdd.distill.krr_st import outer_loss
from ssdd.distill.pool import ModelPool
from ssdd.models import build


@torch.no_grad()
def heldout_batches(heldout: ImageSet, teacher: nn.Module, norm: Normalizer, cfg: DistillConfig, seed: int,
                    device: torch.device | str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed augmented batches of held-out real images with their teacher targets."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(heldout), generator=gen)
    size = min(cfg.batch, len(heldout))
    batches = []
    for k in range(cfg.krr_st.check_batches):
        idx = order.roll(-k * size)[:size]
        x = norm(crop_flip(heldout.images[idx].to(device), cfg.crop_pad, cfg.flip, gen.manual_seed(seed + k)))
        batches.append((x, teacher(x)))
    return batches


def heldout_losses(candidates: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   batches: list[tuple[torch.Tensor, torch.Tensor]], spec: dict, cfg: DistillConfig,
                   seed: int, device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean held-out KRR-ST loss of each candidate (images, targets).

    For each of ``cfg.krr_st.check_models`` evaluation models (own seeds, never in the training pool)
    an age is drawn in [0, max_age); each candidate trains its own copy of that model for that
    many pool steps on itself, as the pool would, and is then scored on every batch. The same
    inits and ages serve every candidate, so the comparison is paired.
    """
    rng = random.Random(seed)
    totals = {name: 0.0 for name in candidates}
    cfg = cfg.krr_st
    for k in range(cfg.check_models):
        torch.manual_seed(10_000 + seed * 100 + k)
        base = build(spec).to(device)
        age = rng.randrange(0, cfg.pool_max_age)
        for name, (x_s, y_s) in candidates.items():
            pool = ModelPool(spec, 1, cfg.pool_max_age + 1, "fixed", cfg.pool_lr, cfg.pool_momentum,
                             cfg.pool_weight_decay, device)
            model = pool.models[pool.add(copy.deepcopy(base))]
            for _ in range(age):
                pool.train_step(0, x_s, y_s)
            with torch.no_grad():
                totals[name] += sum(outer_loss(model, x_s, y_s, x, t, cfg.ridge).item() for x, t in batches) / len(batches)
    return {name: total / cfg.check_models for name, total in totals.items()}
