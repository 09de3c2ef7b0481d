"""MKDT (../shared/methods/mkdt.md): synthetic images and targets whose unrolled student training
imitates the parameter trajectories of knowledge-distillation experts, plus its high-loss
initialisation as a baseline of its own (``high_loss``). The matching loop,
:func:`match_trajectories`, is shared with MTT (``mtt.py``).

The unrolled loop runs in fp32 by design, whatever the stage's precision (see ``trajectory.py``). It keeps
the double-backward graph of every unrolled step, so its memory grows with ``syn_steps`` x the synthetic
minibatch: :func:`check_unroll_memory` estimates one iteration's peak before the first one (and, through
the method's preflight, before the experts are trained) and refuses settings that cannot fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ssdd import distributed
from ssdd.config import MkdtConfig, MttConfig
from ssdd.distill.experts import build_seeded, expert_seed
from ssdd.distill.registry import DistillContext, DistilledSet, register
from ssdd.distill.trajectory import flat_params, param_count, trajectory_matching_loss, unrolled_params
from ssdd.errors import UserError
from ssdd.loss_log import StepLog


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


def mkdt_preflight(ctx: DistillContext) -> None:
    """MKDT's checks that need no experts: does one iteration fit in memory (:func:`check_unroll_memory`)."""
    model = build_seeded(ctx.spec, expert_seed(ctx.seed, 0, "mkdt-student"), ctx.device)  # architecture only
    check_unroll_memory(ctx, "mkdt", ctx.cfg.mkdt, model, F.mse_loss)


@register("mkdt", needs=("distill.mkdt", "distill.experts"), prep=("experts",), preflight=mkdt_preflight)
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
        return loss

    log = StepLog(losses, finish, ctx.device)  # on a GPU read every few iterations, not one sync each

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
            theta_n = unrolled_params(model, theta_0, x_s, y_s, alpha, cfg.syn_steps, cfg.batch_syn, gen, loss_fn)
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


# ---------------------------------------------------------------- memory of one unrolled iteration

FIT_FRACTION = 0.9  # of the free memory one iteration may take (the rest: fragmentation, workspaces)
CPU_ACTIVATION_FACTOR = 3.0  # saved bytes per unrolled image per step / its forward activations (CPU estimate)
CPU_PARAM_COPIES = 6  # parameter-sized tensors kept per unrolled step (CPU estimate)


@dataclass(frozen=True)
class UnrollCost:
    """Bytes one trajectory-matching iteration needs: ``fixed`` + ``steps`` x (``per_step`` + ``batch``
    x ``per_image``), with ``batch`` the synthetic images one process handles per unrolled step."""

    fixed: float  # the synthetic set with its gradients and optimiser state, the trajectory rows
    per_step: float  # parameter-sized tensors each unrolled step keeps (new parameters, gradients)
    per_image: float  # activations (and their double-backward graph) per image per unrolled step

    def need(self, steps: int, batch: int) -> float:
        return self.fixed + steps * (self.per_step + batch * self.per_image)

    def max_batch(self, steps: int, budget: float) -> int:
        """The largest batch that fits ``budget`` with ``steps`` unrolled steps (0: none)."""
        room = budget - self.fixed - steps * self.per_step
        return max(0, math.floor(room / (steps * self.per_image))) if steps and self.per_image > 0 else 0

    def max_steps(self, batch: int, budget: float) -> int:
        """The most unrolled steps that fit ``budget`` over ``batch`` images (0: none)."""
        each = self.per_step + batch * self.per_image
        return max(0, math.floor((budget - self.fixed) / each)) if each > 0 else 0


def free_memory(device: torch.device | str) -> tuple[float, str] | None:
    """(bytes free, where) for work on ``device``: on CUDA the driver's free memory plus what PyTorch's
    allocator holds unused; on the CPU ``MemAvailable`` of /proc/meminfo. None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return float(free + cached), f"cuda:{index}"
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return float(line.split()[1]) * 1024, "the host (MemAvailable)"
        except OSError:
            pass
    return None


def activation_elements(model: nn.Module, image_shape: tuple[int, ...], device: torch.device | str) -> int:
    """Elements of every leaf module's output for one image (in-place outputs counted once): the forward
    activations one image costs (eval mode, no gradient: the model and its buffers are left untouched)."""
    total = 0

    def hook(module: nn.Module, inputs: tuple, out: object) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            if inputs and isinstance(inputs[0], torch.Tensor) and out.data_ptr() == inputs[0].data_ptr():
                return  # in place (ReLU(inplace=True)): the same memory as its input
            total += out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *image_shape, device=device))  # two images: norms that need a batch
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total // 2


def unroll_cost(model: nn.Module, image_shape: tuple[int, ...], out_dim: int, m: int,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                device: torch.device | str) -> UnrollCost:
    """:class:`UnrollCost` of matching with ``model`` on ``m`` synthetic images of ``image_shape`` with
    ``out_dim``-wide targets. On CUDA it is measured: the allocator's peak over one and two unrolled
    steps (forward, double backward, outer backward) on a few images, then on twice as many. On the CPU
    it is estimated from the forward activations of one image (x CPU_ACTIVATION_FACTOR, calibrated on
    ConvNets by peak RSS) and the parameter count."""
    device = torch.device(device)
    p_bytes = 4.0 * param_count(model)
    set_bytes = 4.0 * m * (math.prod(image_shape) + out_dim)
    fixed = 4 * set_bytes + 6 * p_bytes  # set, gradient, momentum, a copy; trajectory rows and theta copies
    if device.type != "cuda":
        per_image = CPU_ACTIVATION_FACTOR * 4.0 * activation_elements(model, image_shape, device)
        return UnrollCost(fixed, CPU_PARAM_COPIES * p_bytes, per_image)
    theta0 = flat_params(model)

    def peak(steps: int, n: int) -> float:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        x = torch.zeros(n, *image_shape, device=device, requires_grad=True)
        y = torch.zeros(n, out_dim, device=device, requires_grad=True)
        lr = torch.tensor(0.01, device=device, requires_grad=True)
        theta = unrolled_params(model, theta0, x, y, lr, steps, 0, None, loss_fn, data_parallel=False)
        trajectory_matching_loss(theta, theta0, theta0 + 1).backward()
        del theta, x, y, lr
        return float(torch.cuda.max_memory_allocated(device) - before)

    n = 32
    peak(1, n)  # warm-up: library handles and workspaces that stay allocated are not the iteration's
    one, two, wide = peak(1, n), peak(2, n), peak(1, 2 * n)
    per_image = max(0.0, (wide - one) / n)
    per_step = max(0.0, (two - one) - n * per_image)
    return UnrollCost(fixed + max(0.0, one - per_step - n * per_image), per_step, per_image)


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def check_unroll_memory(ctx: DistillContext, name: str, cfg: MkdtConfig | MttConfig, model: nn.Module,
                        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Refuse (one-line UserError) settings whose unrolled iteration cannot fit in the free memory of
    ``ctx.device`` (under torchrun: of the rank with least), naming the batch_syn and syn_steps that fit.
    Skipped where the free memory is unknown."""
    m = ctx.cfg.m
    batch = m if cfg.batch_syn <= 0 or cfg.batch_syn >= m else cfg.batch_syn
    ranks = distributed.world()
    mine = len(range(batch)[distributed.share(batch, 0, ranks)])  # the largest share of a minibatch
    free = free_memory(ctx.device)
    free_all = [f for f in distributed.all_gather(free) if f is not None] if ranks > 1 else [free] if free else []
    if not free_all:
        return
    free_bytes, where = min(free_all, key=lambda f: f[0])
    out_dim = int(ctx.spec.get("out_dim", 0)) or 1
    cost = unroll_cost(model, tuple(ctx.source.shape), out_dim, m, loss_fn, ctx.device)
    budget = FIT_FRACTION * free_bytes
    need = cost.need(cfg.syn_steps, mine)
    if not distributed.any_true(need > budget):  # every rank decides alike, or the others would wait forever
        return
    over = f"over {batch} images" + (f" ({mine} per rank)" if ranks > 1 else "")
    max_batch = min(cost.max_batch(cfg.syn_steps, budget) * ranks, batch - 1)
    max_steps = min(cost.max_steps(mine, budget), cfg.syn_steps - 1)
    fixes = ([f"distill.{name}.batch_syn <= {max_batch}"] if max_batch >= 1 else []) + \
        ([f"distill.{name}.syn_steps <= {max_steps}"] if max_steps >= 1 else [])
    advice = ("set " + " or ".join(fixes)) if fixes else "even one image over one step does not fit: free memory"
    raise UserError(f"distill.{name}: {cfg.syn_steps} unrolled steps {over} need ~{_gb(need)}, {_gb(free_bytes)} "
                    f"free on {where}; {advice}")
