"""MTT (Cazenavette et al., CVPR 2022), a labelled baseline: optimises class-balanced synthetic images
(fixed one-hot labels) and one inner lr so that N cross-entropy steps on them from a classifier expert's
epoch-t parameters land on its epoch t + M parameters.

Its experts (prep ``ce_experts``) are the MKDT expert trainer (``engines/experts.py``) with a classifier head,
the source's labels as targets and cross-entropy as the loss; the matching loop is MKDT's
(:func:`ssdd.distill.engines.trajectory.match_trajectories`) with a cross-entropy inner loss and no target optimiser.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ssdd.config import Role, neutral, positive, roles
from ssdd.distill.engines.experts import ExpertsConfig, ExpertTask, run_experts
from ssdd.distill.engines.per_class import balanced_start
from ssdd.distill.engines.seeding import build_seeded, expert_seed
from ssdd.distill.engines.trajectory import BATCH_ORDERS, check_trajectories, match_trajectories
from ssdd.distill.engines.unroll_memory import check_unroll_memory
from ssdd.distill.registry import DistillContext, DistilledSet, SourceLabels, register, register_prep
from ssdd.errors import UserError

# the smallest settings of this module's sections that run end to end (tests/test_methods.py)
SMOKE = {"distill.mtt.iterations": 2, "distill.mtt.syn_steps": 2, "distill.mtt.span": 1,
         "distill.mtt.max_start_epoch": 1, "distill.mtt.experts.count": 2, "distill.mtt.experts.epochs": 2,
         "distill.mtt.experts.batch": 16, "distill.mtt.lr_lr": 1e-7}


def _mtt_experts() -> ExpertsConfig:
    # MTT's buffer.py: SGD lr 0.01, no momentum, no weight decay, batch 256, 100 experts (it trains 50
    # epochs; only 0 .. max_start_epoch + span = 22 are ever read). Its DSA augmentation and ZCA are off here.
    return ExpertsConfig(count=100, epochs=22, lr=0.01, momentum=0.0, weight_decay=0.0, batch=256)


@dataclass
class MttConfig:
    """MTT (Cazenavette et al. 2022): class-balanced real images with fixed one-hot labels whose unrolled
    cross-entropy training imitates classifier experts. Published values: ConvNet-3, 32 px, CIFAR-10, 10 per class.

    Its experts have their own table (``distill.mtt.experts``, the type of ``distill.experts``): MTT's recipe
    (optimiser, 22 epochs) differs from MKDT's, and a change to one must not redo the other's experts."""

    iterations: int = 5000
    syn_steps: int = 30  # N: unrolled student steps on the synthetic set per iteration
    span: int = 2  # M: expert epochs the N steps should cover (MTT's expert_epochs)
    max_start_epoch: int = 20
    lr_images: float = 1e3  # MTT's lr_img
    lr_lr: float = 1e-5
    lr_init: float = 0.01  # MTT's lr_teacher: the learnable inner (and pre-training) learning rate starts here
    momentum: float = 0.5
    batch_syn: int = 0  # synthetic minibatch per unrolled step; 0 = the whole set (MTT's default)
    experts: ExpertsConfig = field(default_factory=_mtt_experts)  # checked by its own check, at distill.mtt.experts
    batch_order: str = "chunks"  # "chunks" or "reference" (MTT's code): see distill.mkdt.batch_order
    ROLES: ClassVar[dict[str, Role]] = roles("iterations syn_steps span max_start_epoch lr_images lr_lr lr_init momentum batch_syn experts",
                                           batch_order=neutral("chunks"))
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"batch_order": BATCH_ORDERS}

    def check(self, at: str, distill: Any) -> None:
        positive(at, self, "iterations syn_steps span max_start_epoch")
        if self.max_start_epoch + self.span > self.experts.epochs:
            raise UserError(f"config: {at}.max_start_epoch + {at}.span = {self.max_start_epoch + self.span} "
                            f"needs experts of that many epochs, but {at}.experts.epochs = {self.experts.epochs}")


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


@register("mtt", config=MttConfig, prep=("ce_experts",), preflight=mtt_preflight)
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
