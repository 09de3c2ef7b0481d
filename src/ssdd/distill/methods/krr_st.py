"""KRR-ST (DESIGN.md, "KRR-ST, exactly") and its variant over expert snapshots, on the KRR-ST engine
(:mod:`ssdd.distill.engines.krr_engine`), with the held-out check of a finished KRR-ST set.

- ``krr_st``: synthetic images and targets whose ridge head on pool-model features predicts the teacher.
- ``krr_st_experts`` (issue 8): KRR-ST whose pool is the KD experts' parameter snapshots (every expert,
  every saved epoch) instead of fresh networks trained on the synthetic set. The kernel KRR-ST matches is
  then the one of networks that learn the teacher from real data, and the pool costs no SGD steps.
- The held-out check (:func:`heldout_batches`, :func:`heldout_losses`): does distillation optimise what it
  should? The KRR-ST loss of candidate sets on held-out real batches, measured with fresh pool-like models
  that no candidate was trained with.

With ``distill.views`` (issue 19, after Boost-SSL-DD) ``krr_st`` learns a target for each fixed view of each
image too, starting from the teacher's features of the initial views. Decision on the support set: the
ridge head is fitted on all m·K views with their targets (the pool models train on all of them as well),
so the kernel is (m·K)²; each view's image gradient flows back through its view onto the one stored image.
Fitting on the m base images alone would leave the view targets without any gradient, and the student
pre-trains on all m·K pairs, so the support set is what the student sees. The held-out check then scores
each candidate with its views.

Its section ``distill.krr_st`` is the engine's parameter set (:class:`KrrStConfig`, defined with the
engine, which FRePo runs too); registering ``krr_st`` with it makes it a table of the config.
"""

from __future__ import annotations

import copy
import random

import torch
from torch import nn

from ssdd import live_log
from ssdd.config import DistillCommon
from ssdd.data import ImageSet, Normalizer
from ssdd.data.augment import crop_flip
from ssdd.distill.engines.krr import outer_loss
from ssdd.distill.engines.krr_engine import DistillResult, KrrStConfig, distill_krr_st
from ssdd.distill.engines.pool import ExpertPool, ModelPool
from ssdd.distill.registry import DistillContext, DistilledSet, random_index, register
from ssdd.models import build
from ssdd.views import transforms as views

# the smallest settings of this module's sections that run end to end (tests/test_methods.py; the
# experts of krr_st_experts are shrunk by mkdt.py's, which registers them)
SMOKE = {"distill.krr_st.steps": 2, "distill.krr_st.pool_size": 2, "distill.krr_st.pool_max_age": 2,
         "distill.krr_st.check_models": 1, "distill.krr_st.check_batches": 1}


@register("krr_st", config=KrrStConfig, prep=("teacher_views",))
def krr_st(ctx: DistillContext) -> DistilledSet:
    """KRR-ST: synthetic images and targets whose ridge head on pool-model features predicts the teacher."""
    result = distill_krr_st(ctx)
    meta = {"init_index": result.init_index.tolist(), "steps": ctx.cfg.krr_st.steps,
            "losses": result.losses, "pool_reinits": result.pool_reinits}
    if ctx.heldout is not None and len(ctx.heldout):
        meta["heldout_check"] = _heldout_check(ctx, result)
    return DistilledSet(result.images, result.targets, meta=meta, view_targets=result.view_targets)


def _with_views(ctx: DistillContext, images: torch.Tensor, targets: torch.Tensor,
                view_targets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A candidate as the ridge head sees it: with ``distill.views``, every view with its target."""
    if ctx.cfg.views == views.NONE:
        return images, targets
    if view_targets is None:
        view_targets = ctx.teacher_view_targets(images)
    return views.expand(images, ctx.cfg.views), views.expand_targets(targets, view_targets)


def _heldout_check(ctx: DistillContext, result: DistillResult) -> dict:
    """KRR-ST loss on held-out real batches: the distilled set, its start, an independent random draw."""
    other = random_index(len(ctx.source), ctx.cfg.m, ctx.seed + 10_007)
    losses = heldout_check_losses(ctx, {
        "distilled": _with_views(ctx, result.images, result.targets, result.view_targets),
        "init": _with_views(ctx, result.init_images, result.init_targets, result.init_view_targets),
        "other_random_subset": _with_views(ctx, ctx.to_space(ctx.source.images[other]), ctx.targets_for(other), None)})
    k = ctx.cfg.krr_st
    for name, value in losses.items():  # one point each, at the last step, beside the loss curve
        live_log.scalar(f"heldout/{name}", value, k.steps)
    losses["note"] = (f"init is the distillation's start, which is also this seed's random_subset set; "
                      f"other_random_subset is an independent draw of m={ctx.cfg.m} images. Measured on "
                      f"{k.check_batches} fixed augmented batches of {len(ctx.heldout)} held-out images with "
                      f"{k.check_models} fresh models.")
    return losses


def heldout_check_losses(ctx: DistillContext, candidates: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """The held-out check's loss of each candidate (images, targets) at ``ctx.seed``: the same batches and
    evaluation models as the check a ``krr_st`` run records (``ssdd diagnose images-vs-targets`` scores
    mixed sets with it)."""
    batches = heldout_batches(ctx.heldout, ctx.teacher, ctx.norm, ctx.cfg, ctx.seed + 7, ctx.device)
    return heldout_losses(candidates, batches, ctx.spec, ctx.cfg, ctx.seed, ctx.device)


@register("krr_st_experts", needs=("distill.krr_st", "distill.experts"), prep=("experts", "teacher_views"))
def krr_st_experts(ctx: DistillContext) -> DistilledSet:
    """KRR-ST with the KD experts' snapshots as its model pool."""
    pool = ExpertPool(ctx.spec, ctx.prep["experts"]["trajectories"], ctx.device, ctx.seed)
    result = distill_krr_st(ctx, pool=pool)
    return DistilledSet(result.images, result.targets, meta={"init_index": result.init_index.tolist(),
                                                             "steps": ctx.cfg.krr_st.steps, "losses": result.losses},
                        view_targets=result.view_targets)


@torch.no_grad()
def heldout_batches(heldout: ImageSet, teacher: nn.Module, norm: Normalizer, cfg: DistillCommon, seed: int,
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
                   batches: list[tuple[torch.Tensor, torch.Tensor]], spec: dict, cfg: DistillCommon,
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
