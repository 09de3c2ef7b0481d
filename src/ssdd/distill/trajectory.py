"""Trajectory matching as pure functions: flat parameter vectors, differentiable unrolled
student training on a synthetic set, and MTT's normalised matching loss.

A model's parameters are handled as one flat vector (the order of ``model.parameters()``);
:func:`unflatten_params` turns it back into named views, so ``torch.func.functional_call`` can
run the model with parameters that carry an autograd graph.

Precision: the unrolled loops (MKDT, MTT) run in fp32 by design, also when the stage's precision is bf16:
they never enter autocast. Their meta-gradient differentiates through every inner step (second
derivatives, an inner lr learned from it), where bf16's 8-bit mantissa would swamp the signal; the
experts that make the trajectories (``experts.py``) do train under autocast.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ssdd import distributed
from ssdd.data.augment import check_generator
from ssdd.data.device_data import upload


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


def minibatches(m: int, batch: int, steps: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Index sets of ``steps`` minibatches of a set of ``m``: successive chunks of a fresh random
    permutation (a new one when it runs out); ``batch`` 0 or >= m means the whole set every step.
    The permutations are drawn where ``generator`` lives (the CPU without one), and the indices stay there."""
    where = generator.device if generator is not None else torch.device("cpu")
    check_generator(generator, where)
    if batch <= 0 or batch >= m:
        return [torch.arange(m, device=where)] * steps
    out: list[torch.Tensor] = []
    order, pos = torch.empty(0, dtype=torch.long, device=where), 0
    for _ in range(steps):
        if pos + batch > len(order):
            order, pos = torch.randperm(m, generator=generator, device=where), 0
        out.append(order[pos:pos + batch])
        pos += batch
    return out


def unrolled_params(model: nn.Module, start_flat: torch.Tensor, images: torch.Tensor, targets: torch.Tensor,
                    lr: torch.Tensor | float, steps: int, batch: int = 0,
                    generator: torch.Generator | None = None,
                    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.mse_loss,
                    data_parallel: bool = True) -> torch.Tensor:
    """Flat parameters after ``steps`` plain gradient steps θ ← θ − lr ∇ loss(f_θ(x_b), y_b) from
    ``start_flat``, keeping the graph so that the result differentiates w.r.t. ``images``,
    ``targets`` and ``lr`` (and ``start_flat`` when it requires grad).

    ``loss`` is the student's training objective: MSE to feature targets (MKDT, the default) or
    ``F.cross_entropy`` to class-probability rows (MTT, one-hot labels); it must be differentiable twice.

    ``model`` only supplies the architecture: its own parameters are not used or changed. It runs
    in train mode; BatchNorm statistics come from each minibatch and updates go to fresh copies of
    its buffers, so the model is left untouched (instance norm, which has no buffers, is the
    intended student).

    Under torchrun each inner step is data-parallel: every rank draws the same minibatch, takes its
    share, and the summed share gradients make the step, so N ranks give one process's result (with
    BatchNorm students the statistics are then per share). The caller sums the image and target
    gradients over the ranks after its backward (see ``mkdt.match_trajectories``). ``data_parallel=False``
    keeps the whole computation on this process (the memory estimate of ``mkdt.unroll_cost``).

    The indices of all ``steps`` minibatches reach the images' device in one copy.
    """
    theta = start_flat if start_flat.requires_grad else start_flat.detach().requires_grad_(True)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    parallel = data_parallel and distributed.active()
    batches = minibatches(len(images), batch, steps, generator)
    sizes = [len(index) for index in batches]
    mine = [index[distributed.share(len(index))] if parallel else index for index in batches]
    if batch <= 0 or batch >= len(images):  # the same (whole-set) indices every step: one copy of them
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
