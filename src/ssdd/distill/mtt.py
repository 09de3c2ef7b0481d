"""MTT (Cazenavette et al., CVPR 2022), a labelled baseline: optimises class-balanced synthetic images
(fixed one-hot labels) and one inner lr so that N cross-entropy steps on them from a classifier expert's
epoch-t parameters land on its epoch t + M parameters.

Its experts (prep ``ce_experts``) are the MKDT expert trainer (``experts.py``) with a classifier head,
the source's labels as targets and cross-entropy as the loss; the matching loop is MKDT's
(:func:`ssdd.distill.mkdt.match_trajectories`) with a cross-entropy inner loss and no target optimiser.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

from ssdd.distill.experts import ExpertTask, build_seeded, expert_seed, run_experts
from ssdd.distill.mkdt import check_trajectories, check_unroll_memory, match_trajectories
from ssdd.distill.per_class import balanced_start
from ssdd.distill.registry import DistillContext, DistilledSet, SourceLabels, register, register_prep
from ssdd.errors import UserError


def classifier_spec(ctx: DistillContext, labels: SourceLabels) -> dict:
    """The student of ``ctx.spec`` with one output per class: MTT's experts and its unrolled student."""
    return {**ctx.spec, "out_dim": labels.num_classes}


def classifier_task(ctx: DistillContext) -> ExpertTask:
    """MTT's experts: classifiers trained by cross-entropy on the source's labels (``distill.mtt.experts``)."""
    labels = ctx.require_labels("mtt")
    return ExpertTask(ctx.cfg.mtt.experts, classifier_spec(ctx, labels), labels.labels.to(ctx.device),
                      F.cross_entropy, functools.partial(F.cross_entropy, reduction="none"),
                      name="ce_experts", seed_tag="ce-")


@register_prep("ce_experts", needs=("distill.mtt.experts",))
def train_ce_experts(ctx: DistillContext) -> dict[str, torch.Tensor]:
    """K cross-entropy classifier experts (MTT's buffer): trajectories, and each example's epoch-1 loss."""
    return run_experts(ctx, classifier_task(ctx))


def mtt_preflight(ctx: DistillContext) -> None:
    """MTT's checks that need no experts: labels, and does one iteration fit in memory."""
    spec = classifier_spec(ctx, ctx.require_labels("mtt"))
    model = build_seeded(spec, expert_seed(ctx.seed, 0, "mtt-student"), ctx.device)  # architecture only
    check_unroll_memory(dataclasses.replace(ctx, spec=spec), "mtt", ctx.cfg.mtt, model, F.cross_entropy)


@register("mtt", needs=("distill.mtt",), prep=("ce_experts",), preflight=mtt_preflight)
def distill_mtt(ctx: DistillContext) -> DistilledSet:
    """Trajectory matching to cross-entropy experts with fixed one-hot labels (MTT, CVPR 2022)."""
    cfg = ctx.cfg.mtt
    labels = ctx.require_labels("mtt")
    if "ce_experts" not in ctx.prep:
        raise UserError("the ce_experts prep stage has not run (method mtt needs it)")
    trajectories = ctx.prep["ce_experts"]["trajectories"]
    spec = classifier_spec(ctx, labels)
    model = build_seeded(spec, expert_seed(ctx.seed, 0, "mtt-student"), ctx.device)  # architecture only
    check_trajectories(trajectories, cfg, "mtt", "distill.mtt.experts", spec, model)
    check_unroll_memory(dataclasses.replace(ctx, spec=spec), "mtt", cfg, model, F.cross_entropy)

    # MTT's real init, for any budget: m // C random images per class (DM and DSA start the same way)
    index = balanced_start(labels.labels, ctx.cfg.m, expert_seed(ctx.seed, 0, "mtt-init")).index
    x_s = ctx.to_space(ctx.source.images[index]).detach().clone().requires_grad_(True)
    y_s = labels.one_hot(index).to(ctx.device)  # fixed: MTT's soft / learned labels are off
    alpha = torch.tensor(float(cfg.lr_init), device=ctx.device, requires_grad=True)
    optimizers = [torch.optim.SGD([x_s], lr=cfg.lr_images, momentum=cfg.momentum),
                  torch.optim.SGD([alpha], lr=cfg.lr_lr, momentum=cfg.momentum)]
    losses, lr_curve = match_trajectories(ctx, "mtt", cfg, trajectories, model, x_s, y_s, alpha, optimizers,
                                          F.cross_entropy)
    counts = torch.bincount(labels.labels[index], minlength=labels.num_classes)
    return DistilledSet(x_s.detach(), y_s, lr=float(alpha.item()), objective="cross_entropy",
                        meta={"init": "real_class_balanced", "init_index": index.tolist(),
                              "class_counts": counts.tolist(), "losses": losses, "lr_curve": lr_curve})
