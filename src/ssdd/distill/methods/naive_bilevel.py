"""Naive bilevel SSL: the paper's motivating baseline (DESIGN.md, "Why MSE and KRR").

Learnable synthetic images ``X_s`` only (no targets). Each outer step builds a fresh model g
(backbone features + a Barlow Twins projector, initialised from the seed and the step), trains it
``inner_steps`` unrolled plain gradient steps on the Barlow Twins loss of two random crop/flip
views of ``X_s``, and scores it by how well its features of an augmented real batch predict the
teacher's features of that batch linearly (a closed-form ridge head fit on one half of the batch,
its MSE measured on the other half).
The gradient reaches ``X_s`` through the unrolled inner steps and the augmentation, so it carries
the randomness of the inner views: the instability KRR-ST removes (see ``diagnose.py``).

The model runs in train mode throughout (BatchNorm batch statistics): a model with a handful of
steps has meaningless running statistics. The set is pre-trained by Barlow Twins, like ``random_ssl``,
which starts from the same paired draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ssdd import live_log
from ssdd.artifacts import restore_rng, rng_state
from ssdd.config import DistillCommon, Role, positive, roles
from ssdd.data import BatchSampler
from ssdd.data.augment import crop_flip
from ssdd.distill.engines.krr import ridge_predict
from ssdd.distill.engines.seeding import seeded_cpu_rng
from ssdd.distill.registry import DistillContext, DistilledSet, register
from ssdd.errors import UserError
from ssdd.loss_log import StepLog
from ssdd.models import build
from ssdd.models.ssl import barlow_twins_loss, projector

# the smallest settings of this module's sections that run end to end (tests/test_methods.py)
SMOKE = {"distill.naive_bilevel.steps": 2, "distill.naive_bilevel.inner_steps": 1,
         "distill.naive_bilevel.projector": [8, 8]}

Params = dict[str, torch.Tensor]


@dataclass
class NaiveBilevelConfig:
    """Naive bilevel SSL: unrolled Barlow Twins steps on augmented synthetic images."""

    steps: int = 200
    inner_steps: int = 3
    inner_lr: float = 0.1
    lr_images: float = 1e-2
    redundancy_weight: float = 5e-3
    projector: list[int] = field(default_factory=lambda: [256, 256])
    ROLES: ClassVar[dict[str, Role]] = roles("steps inner_steps inner_lr lr_images redundancy_weight projector")

    def check(self, at: str, distill: Any) -> None:
        positive(at, self, "steps inner_steps")


class SSLNet(nn.Module):
    """Backbone features (``project=False``) or projector outputs (``project=True``)."""

    def __init__(self, encoder: nn.Module, proj: nn.Module):
        super().__init__()
        self.encoder, self.projector = encoder, proj

    def forward(self, x: torch.Tensor, project: bool = True) -> torch.Tensor:
        h = self.encoder.features(x)
        return self.projector(h) if project else h


def fresh_net(spec: dict, proj_dims: list[int], seed: int, device: torch.device | str = "cpu") -> SSLNet:
    """A model initialised from ``seed`` alone (built on the CPU, so every device gets the same weights);
    the global RNGs are left untouched."""
    with seeded_cpu_rng(seed):
        encoder = build({**spec, "out_dim": 0})  # features only: no head parameters
        net = SSLNet(encoder, projector(encoder.feature_dim, list(proj_dims)))
    return net.to(device).train()


def _call(net: SSLNet, params: Params, x: torch.Tensor, project: bool) -> torch.Tensor:
    # copies of the buffers: BatchNorm's running-statistic updates never touch the module itself
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    return functional_call(net, {**params, **buffers}, (x,), {"project": project})


def inner_train(net: SSLNet, x_s: torch.Tensor, cfg: DistillCommon, gen: torch.Generator) -> Params:
    """``inner_steps`` plain GD steps on Barlow Twins of two crop/flip views of ``x_s``, differentiable
    (create_graph) w.r.t. ``x_s``; returns the final parameters."""
    nb = cfg.naive_bilevel
    params: Params = dict(net.named_parameters())
    for _ in range(nb.inner_steps):
        v1 = crop_flip(x_s, cfg.crop_pad, cfg.flip, gen)
        v2 = crop_flip(x_s, cfg.crop_pad, cfg.flip, gen)
        loss = barlow_twins_loss(_call(net, params, v1, True), _call(net, params, v2, True), nb.redundancy_weight)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {name: p - nb.inner_lr * g for (name, p), g in zip(params.items(), grads)}
    return params


def outer_loss(net: SSLNet, x_s: torch.Tensor, x_real: torch.Tensor, t_real: torch.Tensor, cfg: DistillCommon,
               gen: torch.Generator) -> torch.Tensor:
    """Train ``net`` on ``x_s`` (unrolled), then how well its real features predict the teacher's features
    ``t_real`` linearly: a ridge head fit on one half of the real batch, scored (MSE) on the other half.
    (Fit and scored on the same batch, the head interpolates once features outnumber images, and the
    loss says nothing.)"""
    params = inner_train(net, x_s, cfg, gen)
    g_r = _call(net, params, x_real, False)
    half = len(g_r) // 2
    return (ridge_predict(g_r[:half], g_r[half:], t_real[:half], cfg.krr_st.ridge) - t_real[half:]).pow(2).mean()


def model_seed(seed: int, step: int) -> int:
    """The init seed of the fresh model of outer step ``step``."""
    return (seed + 1) * 1_000_003 + step


@register("naive_bilevel", config=NaiveBilevelConfig, needs=("distill.krr_st.ridge",))  # that ridge: the held-out loss
def naive_bilevel(ctx: DistillContext) -> DistilledSet:
    """Naive bilevel SSL: unrolled Barlow Twins on augmented synthetic images (the noisy-gradient baseline)."""
    cfg, nb, device, hooks = ctx.cfg, ctx.cfg.naive_bilevel, ctx.device, ctx.hooks
    ctx.teacher.eval()
    index = ctx.init_index
    x_s = ctx.to_space(ctx.source.images[index.cpu()]).clone().requires_grad_(True)
    opt = torch.optim.Adam([x_s], lr=nb.lr_images)
    sampler = BatchSampler(ctx.source, cfg.batch, device, ctx.seed + 1)
    aug_gen = torch.Generator(device=device).manual_seed(ctx.seed + 2)
    view_gen = torch.Generator(device=device).manual_seed(ctx.seed + 3)
    losses: list[float] = []
    if hooks.resume is not None:
        state = hooks.resume
        with torch.no_grad():
            x_s.copy_(state["images"])
        opt.load_state_dict(state["opt"])
        sampler.load_state_dict(state["sampler"])
        aug_gen.set_state(state["aug_gen"])
        view_gen.set_state(state["view_gen"])
        restore_rng(state)
        losses = list(state["losses"])

    def finish(step: int, values: list[float], _: object) -> float:
        loss, grad_finite = values
        if not (math.isfinite(loss) and grad_finite):
            raise UserError(f"distill: non-finite naive_bilevel loss or gradient at step {step} (loss {loss:.3g}); "
                            "lower distill.naive_bilevel.lr_images (or distill.naive_bilevel.inner_lr) "
                            "(last checkpoint kept)")
        return loss

    log = StepLog(losses, finish, device, tag="loss")  # on a GPU read every few steps, not one sync per step

    def state() -> dict:
        log.read()
        return {"step": len(losses), "images": x_s.detach().clone(), "opt": opt.state_dict(),
                "sampler": sampler.state_dict(), "aug_gen": aug_gen.get_state(), "view_gen": view_gen.get_state(),
                **rng_state(), "losses": list(losses)}

    bar = tqdm(range(len(losses), nb.steps), desc=f"naive_bilevel s{ctx.seed}", disable=not ctx.progress,
               dynamic_ncols=True, initial=len(losses), total=nb.steps)
    with log.guard():
        for step in bar:
            real, _ = sampler.next()
            x_real = ctx.norm(crop_flip(real, cfg.crop_pad, cfg.flip, aug_gen))
            with torch.no_grad():
                t_real = ctx.teacher(x_real)
            net = fresh_net(ctx.spec, nb.projector, model_seed(ctx.seed, step), device)
            loss = outer_loss(net, x_s, x_real, t_real, cfg, view_gen)
            grad = torch.autograd.grad(loss, [x_s])[0]
            x_s.grad = grad
            opt.step()
            if log.add(step, [loss, torch.isfinite(grad).all()]):
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            live_log.synthetic(step + 1, nb.steps, lambda: ctx.to_unit(x_s))
            hooks.after_step(step + 1, nb.steps, state, "naive_bilevel")
        log.read()
    return DistilledSet(x_s.detach(), None, objective="barlow_twins",
                        meta={"init_index": index.tolist(), "steps": nb.steps, "losses": losses})
