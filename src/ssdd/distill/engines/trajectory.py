"""Trajectory matching: flat parameter vectors, differentiable unrolled student training on a
synthetic set, MTT's normalised matching loss (pure functions), and the matching loop MKDT and MTT share
(:func:`match_trajectories`, with :func:`check_trajectories`).

A model's parameters are handled as one flat vector (the order of ``model.parameters()``);
:func:`unflatten_params` turns it back into named views, so ``torch.func.functional_call`` can
run the model with parameters that carry an autograd graph.

Precision: the unrolled loops (MKDT, MTT) run in fp32 by design, also when the stage's precision is bf16:
they never enter autocast. Their meta-gradient differentiates through every inner step (second
derivatives, an inner lr learned from it), where bf16's 8-bit mantissa would swamp the signal; the
experts that make the trajectories (``experts.py``) do train under autocast.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ssdd import distributed, live_log
from ssdd.data.augment import check_generator
from ssdd.data.device_data import upload
from ssdd.distill.engines.seeding import expert_seed
from ssdd.distill.registry import DistillContext
from ssdd.errors import UserError
from ssdd.loss_log import StepLog


class MatchingSchedule(Protocol):
    """What the matching loop reads of a method's section (``distill.mkdt``, ``distill.mtt``)."""

    iterations: int  # outer iterations
    syn_steps: int  # N: unrolled student steps on the synthetic set per iteration
    span: int  # M: expert epochs the N steps should cover
    max_start_epoch: int  # start epochs are drawn from [0, max_start_epoch)
    batch_syn: int  # synthetic minibatch per unrolled step; 0 = the whole set
    batch_order: str  # "chunks" (ssdd) or "reference" (the MTT / MKDT code): see :func:`minibatches`


def flat_params(model: nn.Module) -> torch.Tensor:
    """A detached float32 copy of the model's parameters as one vector (order of ``model.parameters()``,
    each in its logical NCHW order: ``reshape``, since channels-last weights cannot be ``view``-ed flat)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).float().clone()


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def unflatten_params(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Named views of ``flat`` shaped like the model's parameters (differentiable w.r.t. ``flat``)."""
    if flat.ndim != 1 or flat.numel() != param_count(model):
        raise ValueError(f"flat parameter vector of {tuple(flat.shape)} does not fit a model of "
                         f"{param_count(model)} parameters")
    out, pos = {}, 0
    for name, p in model.named_parameters():
        out[name] = flat[pos:pos + p.numel()].view(p.shape)
        pos += p.numel()
    return out


@torch.no_grad()
def load_flat_params(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy a flat vector into the model's parameters in place (dtype and memory format kept)."""
    for name, value in unflatten_params(model, flat.detach()).items():
        model.get_parameter(name).copy_(value)


BATCH_ORDERS = ("chunks", "reference")


def minibatches(m: int, batch: int, steps: int, generator: torch.Generator | None = None,
                order: str = "chunks") -> list[torch.Tensor]:
    """Index sets of ``steps`` minibatches of a set of ``m``, drawn where ``generator`` lives (the CPU
    without one; the indices stay there).

    ``order="chunks"`` (ssdd): successive full chunks of a fresh random permutation (a new one when fewer
    than ``batch`` indices are left, so the remainder of a permutation is never used); ``batch`` 0 or >= m
    means the whole set, in order, every step, and draws nothing.
    ``order="reference"`` (the MTT / MKDT code): a fresh permutation is split into chunks of ``batch``
    (the whole set when ``batch`` is 0 or >= m) and the chunks are used last first, so the short
    remainder chunk comes first and every image is used once per permutation."""
    where = generator.device if generator is not None else torch.device("cpu")
    check_generator(generator, where)
    if order not in BATCH_ORDERS:
        raise ValueError(f"batch order must be one of {BATCH_ORDERS}, got {order!r}")
    whole = batch <= 0 or batch >= m
    if order == "reference":
        out, chunks = [], []
        for _ in range(steps):
            if not chunks:
                chunks = list(torch.randperm(m, generator=generator, device=where).split(m if whole else batch))
            out.append(chunks.pop())
        return out
    if whole:
        return [torch.arange(m, device=where)] * steps
    out = []
    perm, pos = torch.empty(0, dtype=torch.long, device=where), 0
    for _ in range(steps):
        if pos + batch > len(perm):
            perm, pos = torch.randperm(m, generator=generator, device=where), 0
        out.append(perm[pos:pos + batch])
        pos += batch
    return out


def unrolled_params(model: nn.Module, start_flat: torch.Tensor, images: torch.Tensor, targets: torch.Tensor,
                    lr: torch.Tensor | float, steps: int, batch: int = 0,
                    generator: torch.Generator | None = None,
                    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.mse_loss,
                    data_parallel: bool = True, order: str = "chunks") -> torch.Tensor:
    """Flat parameters after ``steps`` plain gradient steps θ ← θ − lr ∇ loss(f_θ(x_b), y_b) from
    ``start_flat``, keeping the graph so that the result differentiates w.r.t. ``images``,
    ``targets`` and ``lr`` (and ``start_flat`` when it requires grad). The minibatches are
    :func:`minibatches` of ``batch`` in ``order``.

    ``loss`` is the student's training objective: MSE to feature targets (MKDT, the default) or
    ``F.cross_entropy`` to class-probability rows (MTT, one-hot labels); it must be differentiable twice.

    ``model`` only supplies the architecture: its own parameters are not used or changed. It runs
    in train mode; BatchNorm statistics come from each minibatch and updates go to fresh copies of
    its buffers, so the model is left untouched (instance norm, which has no buffers, is the
    intended student).

    Under torchrun each inner step is data-parallel: every rank draws the same minibatch, takes its
    share, and the summed share gradients make the step, so N ranks give one process's result (with
    BatchNorm students the statistics are then per share). The caller sums the image and target
    gradients over the ranks after its backward (see :func:`match_trajectories`). ``data_parallel=False``
    keeps the whole computation on this process (the memory estimate of ``unroll_memory.unroll_cost``).

    The indices of all ``steps`` minibatches reach the images' device in one copy.
    """
    theta = start_flat if start_flat.requires_grad else start_flat.detach().requires_grad_(True)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    parallel = data_parallel and distributed.active()
    batches = minibatches(len(images), batch, steps, generator, order)
    sizes = [len(index) for index in batches]
    mine = [index[distributed.share(len(index))] if parallel else index for index in batches]
    if order == "chunks" and (batch <= 0 or batch >= len(images)):  # the same (whole-set) indices every step
        mine = [upload(mine[0], images.device)] * steps if steps else []
    elif mine:
        mine = list(upload(torch.cat(mine), images.device).split([len(i) for i in mine]))
    was_training = model.training
    model.train()
    try:
        for size, rows in zip(sizes, mine):
            theta_in = distributed.share_input(theta) if parallel else theta
            if len(rows):
                out = functional_call(model, {**unflatten_params(model, theta_in), **buffers}, (images[rows],))
                share_loss = loss(out, targets[rows]) * (len(rows) / size)
            else:  # a minibatch smaller than the number of ranks: this rank adds nothing, but takes part
                share_loss = (theta_in * 0).sum()
            (grad,) = torch.autograd.grad(share_loss, theta_in, create_graph=True)
            theta = theta - lr * (distributed.sum_shares(grad) if parallel else grad)
    finally:
        model.train(was_training)
    return theta


def trajectory_matching_loss(theta_n: torch.Tensor, theta_start: torch.Tensor, theta_target: torch.Tensor) -> torch.Tensor:
    """MTT's normalised parameter distance ‖θ_N − θ*‖² / ‖θ₀ − θ*‖² (sums over every parameter;
    the denominator is a constant)."""
    den = (theta_start.detach() - theta_target.detach()).pow(2).sum()
    return (theta_n - theta_target.detach()).pow(2).sum() / den


def check_trajectories(trajectories: torch.Tensor, cfg: MatchingSchedule, name: str, experts_key: str,
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


def match_trajectories(ctx: DistillContext, name: str, cfg: MatchingSchedule, trajectories: torch.Tensor,
                       model: nn.Module, x_s: torch.Tensor, y_s: torch.Tensor, alpha: torch.Tensor,
                       optimizers: list[torch.optim.Optimizer],
                       loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.mse_loss,
                       ) -> tuple[list[float], list[float]]:
    """MTT's outer loop, shared by mkdt and mtt: per iteration an expert (cycling a shuffled list) and a
    start epoch t < max_start_epoch; ``syn_steps`` unrolled ``loss_fn`` steps on (``x_s``, ``y_s``) at the
    inner lr ``alpha`` from epoch t should land on epoch t + span; one backward, every optimiser steps.
    Updates the tensors in place, checkpoints and resumes through ``ctx.hooks``; returns (losses, lr curve).

    The losses and the learned lr stay on the device and are read every few iterations (a
    :class:`StepLog`), where they are checked: a non-finite loss or a non-positive lr is reported then,
    naming the iteration where it happened."""
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

    def finish(it: int, values: list[float], where: tuple[int, int]) -> float:
        loss, lr_used, lr_after = values
        if not math.isfinite(loss):
            raise UserError(f"{name}: non-finite trajectory-matching loss at iteration {it} (expert {where[0]}, "
                            f"start epoch {where[1]}, inner lr {lr_used:.3g}); lower distill.{name}.lr_images or "
                            f"distill.{name}.lr_lr (or distill.{name}.syn_steps)")
        if not lr_after > 0:
            raise UserError(f"{name}: the learned inner lr became {lr_after:.3g} at iteration {it}; "
                            f"lower distill.{name}.lr_lr")
        lr_curve.append(lr_after)
        live_log.scalar("lr", lr_after, it)
        return loss

    log = StepLog(losses, finish, ctx.device, tag="loss")  # on a GPU read every few iterations, not one sync each

    def state() -> dict:
        log.read()
        return {"step": len(losses), "x_s": x_s.detach().clone(), "y_s": y_s.detach().clone(),
                "alpha": alpha.detach().clone(), "optimizers": [opt.state_dict() for opt in optimizers],
                "gen": gen.get_state(), "queue": list(queue), "losses": list(losses), "lr_curve": list(lr_curve)}

    bar = tqdm(range(len(losses), cfg.iterations), desc=name, disable=not ctx.progress, dynamic_ncols=True,
               initial=len(losses), total=cfg.iterations)
    with log.guard():
        for it in bar:
            if not queue:
                queue = torch.randperm(k_experts, generator=gen).tolist()
            e = queue.pop(0)
            t = int(torch.randint(0, cfg.max_start_epoch, (1,), generator=gen))
            theta_0, theta_star = trajectory_rows(trajectories, e, t, t + cfg.span, ctx.device)
            lr_used = alpha.detach().clone()
            theta_n = unrolled_params(model, theta_0, x_s, y_s, alpha, cfg.syn_steps, cfg.batch_syn, gen, loss_fn,
                                      order=cfg.batch_order)
            loss = trajectory_matching_loss(theta_n, theta_0, theta_star)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            # under torchrun each rank holds the gradient of its shares of the synthetic set: add them up
            # (the inner lr's gradient is already whole on every rank)
            if distributed.active():
                for v in (x_s, y_s):
                    if v.requires_grad and v.grad is None:  # a rank whose shares were all empty
                        v.grad = torch.zeros_like(v)
                distributed.all_reduce_sum_([v.grad for v in (x_s, y_s) if v.requires_grad])
            for opt in optimizers:
                opt.step()
            if log.add(it, [loss, lr_used, alpha.detach().clone()], (e, t)):
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr_curve[-1]:.4g}", refresh=False)
            step = it + 1
            live_log.synthetic(step, cfg.iterations, lambda: ctx.to_unit(x_s))
            hooks.after_step(step, cfg.iterations, state, name)
        log.read()
    return losses, lr_curve


def trajectory_rows(trajectories: torch.Tensor, expert: int, start: int, target: int,
                    device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``expert``'s parameters at epochs ``start`` and ``target`` as float32 on ``device``. From CPU
    trajectories to a GPU the two rows go together through pinned memory, without waiting for the copy
    (the trajectories themselves are not pinned: they can be far larger than one iteration needs)."""
    device = torch.device(device)
    if device.type == "cuda" and trajectories.device.type == "cpu":
        rows = torch.empty((2, trajectories.shape[-1]), dtype=trajectories.dtype, pin_memory=True)
        torch.stack([trajectories[expert, start], trajectories[expert, target]], out=rows)
        rows = rows.to(device, torch.float32, non_blocking=True)
        return rows[0], rows[1]
    return trajectories[expert, start].to(device, torch.float32), trajectories[expert, target].to(device, torch.float32)
