"""MKDT (../shared/methods/mkdt.md): synthetic images and targets whose unrolled student training
imitates the parameter trajectories of knowledge-distillation experts, plus its high-loss
initialisation as a baseline of its own (``high_loss``). The matching loop,
:func:`match_trajectories`, is shared with MTT (``mtt.py``)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ssdd import distributed
from ssdd.config import MkdtConfig, MttConfig
from ssdd.distill.experts import build_seeded, expert_seed
from ssdd.distill.registry import DistillContext, DistilledSet, register
from ssdd.distill.trajectory import param_count, trajectory_matching_loss, unrolled_params
from ssdd.errors import UserError


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
    if init == "krr_st":
        raise UserError("distill.mkdt.init=krr_st is not available here; use high_loss or random")
    raise UserError(f"distill.mkdt.init must be high_loss, random or krr_st, got {init!r}")


@register("high_loss", needs=("distill.experts",), prep=("experts",))
def high_loss_subset(ctx: DistillContext) -> DistilledSet:
    """The m real images the KD experts fit worst after one epoch, with teacher targets (MKDT's init)."""
    index = high_loss_index(_experts(ctx)["epoch1_loss"], ctx.cfg.m)
    images = ctx.to_space(ctx.source.images[index])
    return DistilledSet(images, ctx.targets_for(index), meta={"init_index": index.tolist()})


@register("mkdt", needs=("distill.mkdt", "distill.experts"), prep=("experts",))
def distill_mkdt(ctx: DistillContext) -> DistilledSet:
    """Trajectory matching to knowledge-distillation experts (MKDT, ICLR 2025)."""
    cfg = ctx.cfg.mkdt
    trajectories = _experts(ctx)["trajectories"]
    ctx.teacher.eval()
    model = build_seeded(ctx.spec, expert_seed(ctx.seed, 0, "mkdt-student"), ctx.device)  # architecture only
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


def check_trajectories(trajectories: torch.Tensor, cfg: MkdtConfig | MttConfig, name: str, experts_key: str,
                       spec: dict, model: nn.Module) -> None:
    """One clear error when the experts' trajectories are too short for ``cfg`` or were trained with
    another student than ``model``, the one matched."""
    if trajectories.ndim != 3 or trajectories.shape[1] < cfg.max_start_epoch + cfg.span + 1:
        raise UserError(f"experts: trajectories of {trajectories.shape[1] - 1 if trajectories.ndim == 3 else '?'} "
                        f"epochs, but distill.{name}.max_start_epoch + distill.{name}.span = "
                        f"{cfg.max_start_epoch + cfg.span}; raise {experts_key}.epochs")
    if param_count(model) != trajectories.shape[2]:
        raise UserError(f"experts: trajectories hold {trajectories.shape[2]} parameters, but the student "
                        f"({spec.get('arch')}) has {param_count(model)}; redo the experts stage")


def match_trajectories(ctx: DistillContext, name: str, cfg: MkdtConfig | MttConfig, trajectories: torch.Tensor,
                       model: nn.Module, x_s: torch.Tensor, y_s: torch.Tensor, alpha: torch.Tensor,
                       optimizers: list[torch.optim.Optimizer],
                       loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.mse_loss,
                       ) -> tuple[list[float], list[float]]:
    """MTT's outer loop, shared by mkdt and mtt: per iteration an expert (cycling a shuffled list) and a
    start epoch t < max_start_epoch; ``syn_steps`` unrolled ``loss_fn`` steps on (``x_s``, ``y_s``) at the
    inner lr ``alpha`` from epoch t should land on epoch t + span; one backward, every optimiser steps.
    Updates the tensors in place, checkpoints and resumes through ``ctx.hooks``; returns (losses, lr curve)."""
    hooks = ctx.hooks
    gen = torch.Generator().manual_seed(expert_seed(ctx.seed, 0, name))
    k_experts = trajectories.shape[0]
    queue: list[int] = []  # experts left in the current shuffled cycle
    losses: list[float] = []
    lr_curve: list[float] = []
    if hooks.resume is not None:
        st = hooks.resume
        with torch.no_grad():
            x_s.copy_(st["x_s"])
            y_s.copy_(st["y_s"])
            alpha.copy_(st["alpha"])
        for opt, opt_state in zip(optimizers, st["optimizers"]):
            opt.load_state_dict(opt_state)
        gen.set_state(st["gen"])
        queue = [int(e) for e in st["queue"]]
        losses, lr_curve = list(st["losses"]), list(st["lr_curve"])

    def state() -> dict:
        return {"step": len(losses), "x_s": x_s.detach().clone(), "y_s": y_s.detach().clone(),
                "alpha": alpha.detach().clone(), "optimizers": [opt.state_dict() for opt in optimizers],
                "gen": gen.get_state(), "queue": list(queue), "losses": list(losses), "lr_curve": list(lr_curve)}

    bar = tqdm(range(len(losses), cfg.iterations), desc=name, disable=not ctx.progress, dynamic_ncols=True,
               initial=len(losses), total=cfg.iterations)
    for it in bar:
        if not queue:
            queue = torch.randperm(k_experts, generator=gen).tolist()
        e = queue.pop(0)
        t = int(torch.randint(0, cfg.max_start_epoch, (1,), generator=gen))
        theta_0 = trajectories[e, t].to(ctx.device, torch.float32)
        theta_star = trajectories[e, t + cfg.span].to(ctx.device, torch.float32)
        theta_n = unrolled_params(model, theta_0, x_s, y_s, alpha, cfg.syn_steps, cfg.batch_syn, gen, loss_fn)
        loss = trajectory_matching_loss(theta_n, theta_0, theta_star)
        if not torch.isfinite(loss):
            raise UserError(f"{name}: non-finite trajectory-matching loss at iteration {it} (expert {e}, start epoch "
                            f"{t}, inner lr {alpha.item():.3g}); lower distill.{name}.lr_images or "
                            f"distill.{name}.lr_lr (or distill.{name}.syn_steps)")
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        # under torchrun each rank holds the gradient of its shares of the synthetic set: add them up
        # (the inner lr's gradient is already whole on every rank)
        if distributed.active():
            for t in (x_s, y_s):
                if t.requires_grad and t.grad is None:  # a rank whose shares were all empty
                    t.grad = torch.zeros_like(t)
            distributed.all_reduce_sum_([t.grad for t in (x_s, y_s) if t.requires_grad])
        for opt in optimizers:
            opt.step()
        if not alpha.item() > 0:
            raise UserError(f"{name}: the learned inner lr became {alpha.item():.3g} at iteration {it}; "
                            f"lower distill.{name}.lr_lr")
        losses.append(loss.item())
        lr_curve.append(alpha.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr_curve[-1]:.4g}", refresh=False)
        step = it + 1
        hooks.after_step(step, cfg.iterations, state, name)
    return losses, lr_curve
