"""MKDT (../shared/methods/mkdt.md): synthetic images and targets whose unrolled student training
imitates the parameter trajectories of knowledge-distillation experts, plus its high-loss
initialisation as a baseline of its own (``high_loss``), its KD experts (prep ``experts``), and
``mkdt_aug`` (issue 8): MKDT matched to augmentation-consistent experts (prep ``experts_aug``: each expert
regresses the teacher's features of the very crop/flip view it sees), whose trajectories should carry more
of the teacher than experts that see each image in one fixed view. The matching loop,
:func:`ssdd.distill.engines.trajectory.match_trajectories`, is shared with MTT (``mtt.py``).

The unrolled loop runs in fp32 by design, whatever the stage's precision (see ``engines/trajectory.py``).
It keeps the double-backward graph of every unrolled step, so its memory grows with ``syn_steps`` x the
synthetic minibatch: :func:`ssdd.distill.engines.unroll_memory.check_unroll_memory` estimates one
iteration's peak before the first one (and, through the method's preflight, before the experts are
trained) and refuses settings that cannot fit.

Sections: ``distill.mkdt`` (:class:`MkdtConfig`, here) and ``distill.experts`` (the experts engine's
:class:`~ssdd.distill.engines.experts.ExpertsConfig`, registered with the ``experts`` prep).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ssdd.config import Role, neutral, positive, roles
from ssdd.distill.engines.experts import ExpertsConfig, kd_task, run_experts
from ssdd.distill.engines.seeding import build_seeded, expert_seed
from ssdd.distill.engines.trajectory import BATCH_ORDERS, check_trajectories, match_trajectories
from ssdd.distill.engines.unroll_memory import check_unroll_memory
from ssdd.distill.registry import DistillContext, DistilledSet, register, register_prep, replaced
from ssdd.errors import UserError

# the smallest settings of this module's sections (its methods' and its experts') that run end to end
# (tests/test_methods.py)
SMOKE = {"distill.experts.count": 2, "distill.experts.epochs": 2, "distill.experts.batch": 16,
         "distill.mkdt.iterations": 2, "distill.mkdt.syn_steps": 2, "distill.mkdt.span": 1,
         "distill.mkdt.max_start_epoch": 1}


@dataclass
class MkdtConfig:
    """MKDT (../shared/methods/mkdt.md): trajectory matching to the KD experts."""

    iterations: int = 5000
    syn_steps: int = 40  # N: unrolled student steps on the synthetic set per iteration
    span: int = 2  # M: expert epochs the N steps should cover
    max_start_epoch: int = 2
    lr_images: float = 1e3
    lr_targets: float = 1.0
    lr_lr: float = 1e-4
    lr_init: float = 0.1  # the learnable inner (and pre-training) learning rate starts here
    momentum: float = 0.5
    batch_syn: int = 0  # synthetic minibatch per unrolled step; 0 = the whole set
    init: str = "high_loss"  # "high_loss" (MKDT) or "random" (the paired random draw)
    # minibatches of batch_syn: "chunks" (full chunks of each permutation, the remainder unused) or
    # "reference" (the authors' code: the permutation's chunks last first, the short remainder first)
    batch_order: str = "chunks"
    ROLES: ClassVar[dict[str, Role]] = roles("iterations syn_steps span max_start_epoch lr_images lr_targets lr_lr lr_init momentum batch_syn init",
                                           batch_order=neutral("chunks"))
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"init": ("high_loss", "random"), "batch_order": BATCH_ORDERS}

    def check(self, at: str, distill: Any) -> None:
        positive(at, self, "iterations syn_steps span max_start_epoch")
        if self.max_start_epoch + self.span > distill.experts.epochs:
            raise UserError(f"config: {at}.max_start_epoch + {at}.span = {self.max_start_epoch + self.span} "
                            f"needs experts of that many epochs, but distill.experts.epochs = {distill.experts.epochs}")


def high_loss_index(scores: torch.Tensor, m: int) -> torch.Tensor:
    """The ``m`` examples of highest score, highest first (ties: lower index first)."""
    if m > len(scores):
        raise UserError(f"distill.m={m} is larger than the source ({len(scores)} images)")
    return torch.argsort(scores.cpu(), descending=True, stable=True)[:m]


def _experts(ctx: DistillContext) -> dict[str, torch.Tensor]:
    if "experts" not in ctx.prep:
        raise UserError("the experts prep stage has not run (methods mkdt and high_loss need it)")
    return ctx.prep["experts"]


def initial_index(ctx: DistillContext) -> torch.Tensor:
    """Which source images MKDT starts from (``distill.mkdt.init``)."""
    init = ctx.cfg.mkdt.init
    if init == "high_loss":
        return high_loss_index(_experts(ctx)["epoch1_loss"], ctx.cfg.m)
    if init == "random":
        return ctx.init_index.cpu()
    raise UserError(f"distill.mkdt.init must be high_loss or random, got {init!r}")


@register("high_loss", needs=("distill.experts",), prep=("experts",))
def high_loss_subset(ctx: DistillContext) -> DistilledSet:
    """The m real images the KD experts fit worst after one epoch, with teacher targets (MKDT's init)."""
    index = high_loss_index(_experts(ctx)["epoch1_loss"], ctx.cfg.m)
    images = ctx.to_space(ctx.source.images[index])
    return DistilledSet(images, ctx.targets_for(index), meta={"init_index": index.tolist()})


def mkdt_preflight(ctx: DistillContext) -> None:
    """MKDT's checks that need no experts: does one iteration fit in memory (:func:`check_unroll_memory`)."""
    model = build_seeded(ctx.spec, expert_seed(ctx.seed, 0, "mkdt-student"), ctx.device)  # architecture only
    check_unroll_memory(ctx, "mkdt", ctx.cfg.mkdt, model, F.mse_loss)


@register("mkdt", config=MkdtConfig, needs=("distill.experts",), prep=("experts",), preflight=mkdt_preflight)
def distill_mkdt(ctx: DistillContext) -> DistilledSet:
    """Trajectory matching to knowledge-distillation experts (MKDT, ICLR 2025)."""
    cfg = ctx.cfg.mkdt
    model = build_seeded(ctx.spec, expert_seed(ctx.seed, 0, "mkdt-student"), ctx.device)  # architecture only
    check_unroll_memory(ctx, "mkdt", cfg, model, F.mse_loss)
    trajectories = _experts(ctx)["trajectories"]
    ctx.teacher.eval()
    check_trajectories(trajectories, cfg, "mkdt", "distill.experts", ctx.spec, model)

    index = initial_index(ctx)
    x_s = ctx.to_space(ctx.source.images[index]).detach().clone().requires_grad_(True)
    y_s = ctx.targets_for(index).detach().clone().float().requires_grad_(True)
    alpha = torch.tensor(float(cfg.lr_init), device=ctx.device, requires_grad=True)
    optimizers = [torch.optim.SGD([x_s], lr=cfg.lr_images, momentum=cfg.momentum),
                  torch.optim.SGD([y_s], lr=cfg.lr_targets, momentum=cfg.momentum),
                  torch.optim.SGD([alpha], lr=cfg.lr_lr, momentum=cfg.momentum)]
    losses, lr_curve = match_trajectories(ctx, "mkdt", cfg, trajectories, model, x_s, y_s, alpha, optimizers)
    return DistilledSet(x_s.detach(), y_s.detach(), lr=float(alpha.item()),
                        meta={"init": cfg.init, "init_index": index.tolist(), "losses": losses, "lr_curve": lr_curve})


@register_prep("experts", config=ExpertsConfig)
def train_experts(ctx: DistillContext) -> dict[str, torch.Tensor]:
    """K knowledge-distillation experts and the high-loss scores (MKDT stages 1-2)."""
    ctx.teacher.eval()
    return run_experts(ctx, kd_task(ctx))


@register_prep("experts_aug", needs=("distill.experts",))
def train_augmented_experts(ctx: DistillContext) -> dict[str, torch.Tensor]:
    """The KD experts, trained on crop/flip views with the teacher's features of each view."""
    cfg = replaced(ctx.cfg, experts=dataclasses.replace(ctx.cfg.experts, augment=True))  # ctx.cfg: a declared view
    return train_experts(dataclasses.replace(ctx, cfg=cfg))


@register("mkdt_aug", needs=("distill.mkdt", "distill.experts"), prep=("experts_aug",), preflight=mkdt_preflight)
def mkdt_aug(ctx: DistillContext) -> DistilledSet:
    """MKDT matched to augmentation-consistent experts."""
    result = distill_mkdt(dataclasses.replace(ctx, prep={"experts": ctx.prep["experts_aug"]}))
    result.meta["experts"] = "augmentation-consistent"
    return result
