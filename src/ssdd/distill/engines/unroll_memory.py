"""Memory of one unrolled trajectory-matching iteration (MKDT, MTT), estimated before the first one.

The unrolled loop (:func:`ssdd.distill.engines.trajectory.match_trajectories`) keeps the double-backward
graph of every unrolled step, so its memory grows with ``syn_steps`` x the synthetic minibatch:
:func:`check_unroll_memory` estimates one iteration's peak (and, through a method's preflight, before the
experts are trained) and refuses settings that cannot fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ssdd import distributed
from ssdd.distill.engines.trajectory import (MatchingSchedule, flat_params, param_count, trajectory_matching_loss,
                                             unrolled_params)
from ssdd.distill.registry import DistillContext
from ssdd.errors import UserError

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


def check_unroll_memory(ctx: DistillContext, name: str, cfg: MatchingSchedule, model: nn.Module,
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
