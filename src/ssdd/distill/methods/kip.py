"""KIP (kernel inducing points; Nguyen, Chen & Lee, ICLR 2021), labelled: optimises m synthetic images so that
kernel ridge regression from them, with their one-hot labels, predicts the labels of real batches (MSE).

The kernel is a random-feature (NNGP-style) kernel of the ``model`` ConvNet, not the NTK: an empirical NTK of
ConvNet-3 costs a Jacobian per image, too much on a CPU, and the published infinite-width kernels need
neural-tangents. ``K(x, x') = (1/M) sum_i phi_i(x) . phi_i(x')`` with ``phi_i`` the features (before the head)
of the i-th of M = ``distill.kip.models`` freshly initialised ConvNets in eval mode, redrawn every step from
seeds fixed by (seed, step, i): each step sees a new Monte-Carlo estimate of the network's NNGP kernel (as RFAD
does), so the images cannot fit one draw of weights, and a resumed run draws the same networks.

From KIP: loss ``1/2 mean((K_ts (K_ss + lambda I)^-1 Y_s - Y_t)^2)`` with centred one-hot labels (one-hot - 1/C),
``lambda = ridge * trace(K_ss) / m``, Adam at 0.01 on the images, a class-balanced real start (m split over the
classes as evenly as possible). Not from KIP: no ZCA whitening, uniformly drawn real batches of ``distill.batch``
(KIP draws class-balanced ones), no augmentation.

Targets: by default the labels are fixed and the set stores their one-hot rows (objective ``cross_entropy``).
With ``learn_labels`` (KIP's option) the label vectors are learned too; they are then regression targets, no
longer class probabilities, so the set stores them (plus 1/C, undoing the centring: unchanged rows stay
one-hot) with objective ``mse``, and pre-training regresses onto them as the kernel regression did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from ssdd import live_log
from ssdd.config import Role, positive, roles
from ssdd.data import BatchSampler
from ssdd.distill.engines.krr import spd_solve
from ssdd.distill.engines.labels import centred_one_hot
from ssdd.distill.engines.seeding import seeded_cpu_rng
from ssdd.distill.registry import DistillContext, DistilledSet, register
from ssdd.errors import UserError
from ssdd.loss_log import StepLog
from ssdd.models import Encoder, build
from ssdd.precision import autocast, full_precision

# the smallest settings of this module's sections that run end to end (tests/test_methods.py)
SMOKE = {"distill.kip.steps": 2, "distill.kip.models": 1}


@dataclass
class KipConfig:
    """KIP (Nguyen et al., ICLR 2021), labelled: images whose kernel ridge regression predicts real labels;
    here with a random-feature (NNGP-style) kernel of the ``model`` ConvNet (see ``ssdd.distill.methods.kip``)."""

    steps: int = 1000  # the KIP authors' colab: ~1000 steps or more for convergence
    lr_images: float = 0.01  # Adam (KIP, ICLR 2021)
    lr_labels: float = 0.01  # Adam, only with learn_labels
    ridge: float = 1e-6  # lambda = ridge * trace(K_ss) / m (KIP)
    models: int = 4  # freshly initialised ConvNets per step whose features make the kernel (ours; not in KIP)
    learn_labels: bool = False  # KIP's optional label learning; the set is then stored for MSE pre-training
    ROLES: ClassVar[dict[str, Role]] = roles("steps lr_images lr_labels ridge models learn_labels")

    def check(self, at: str, distill: Any) -> None:
        positive(at, self, "steps models")


KERNEL = ("random-feature NNGP estimate: mean over distill.kip.models freshly initialised `model` ConvNets "
          "(eval mode, redrawn every step) of phi(x).phi(x'), phi = features before the head")


def kip_predict(phi_s: torch.Tensor, phi_t: torch.Tensor, y_s: torch.Tensor, ridge: float) -> torch.Tensor:
    """KRR prediction ``K_ts (K_ss + lambda I)^-1 Y_s`` for linear kernels on the features, with KIP's
    ``lambda = ridge * trace(K_ss) / m`` (held constant: no gradient through it). Kernels in fp32 or wider, the
    solve in fp64 (:func:`ssdd.distill.engines.krr.spd_solve`)."""
    dtype = torch.promote_types(phi_s.dtype, torch.float32)
    with full_precision(phi_s.device):
        fs, ft = phi_s.to(dtype), phi_t.to(dtype)
        k_ss, k_ts = fs @ fs.T, ft @ fs.T
        lam = ridge * torch.trace(k_ss).detach() / len(fs)
        eye = torch.eye(len(fs), device=fs.device, dtype=torch.float64)
        alpha = spd_solve(k_ss.double() + lam.double() * eye, y_s.double())
        return k_ts @ alpha.to(dtype)


def kip_loss(phi_s: torch.Tensor, phi_t: torch.Tensor, y_s: torch.Tensor, y_t: torch.Tensor,
             ridge: float) -> torch.Tensor:
    """KIP's loss: half the mean squared error of the KRR prediction of the real labels ``y_t``."""
    pred = kip_predict(phi_s, phi_t, y_s, ridge)
    with full_precision(pred.device):
        return 0.5 * (pred - y_t.to(pred.dtype)).pow(2).mean()


def class_balanced_index(labels: torch.Tensor, num_classes: int, m: int, seed: int) -> torch.Tensor:
    """m source indices split over the classes as evenly as possible (the remainder to classes in a seeded
    order; a class with too few images gives what it has and the others make up the rest), sorted by class."""
    if m > len(labels):
        raise UserError(f"distill.m={m} is larger than the source ({len(labels)} images)")
    gen = torch.Generator().manual_seed(seed)
    members = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    members = [idx[torch.randperm(len(idx), generator=gen)] for idx in members]
    order = torch.randperm(num_classes, generator=gen).tolist()
    quota, left = [0] * num_classes, m
    while left:
        for c in order:
            if left and quota[c] < len(members[c]):
                quota[c] += 1
                left -= 1
    return torch.cat([members[c][:quota[c]] for c in range(num_classes)])


def feature_models(spec: dict, count: int, seed: int, step: int, device: torch.device | str) -> list[Encoder]:
    """``count`` freshly initialised networks of ``spec`` (frozen, eval mode), each from its own seed derived
    from (seed, step, i); the global RNG is left as it was."""
    models = []
    for i in range(count):
        with seeded_cpu_rng(int(np.random.SeedSequence([seed, step, i]).generate_state(1)[0])):
            model = build({**spec, "out_dim": 0})
        models.append(model.to(device).eval().requires_grad_(False))
    return models


def random_features(models: list[Encoder], x: torch.Tensor) -> torch.Tensor:
    """Concatenated features of every model, scaled so that their Gram matrix is the mean of the models' kernels."""
    return torch.cat([model.features(x).flatten(1) for model in models], 1) / math.sqrt(len(models))


@register("kip", config=KipConfig)
def kip(ctx: DistillContext) -> DistilledSet:
    """KIP: class-balanced images whose KRR under a random-feature ConvNet kernel predicts real labels."""
    labels = ctx.require_labels("kip")
    k, device, hooks = ctx.cfg.kip, ctx.device, ctx.hooks
    targets = centred_one_hot(labels, device)
    index = class_balanced_index(labels.labels, labels.num_classes, ctx.cfg.m, ctx.seed)
    x_s = ctx.to_space(ctx.source.images[index]).clone().contiguous(memory_format=torch.channels_last)
    x_s.requires_grad_(True)
    x0 = x_s.detach().clone()
    y_s = targets(index).requires_grad_(k.learn_labels)
    opt = torch.optim.Adam([{"params": [x_s], "lr": k.lr_images}]
                           + ([{"params": [y_s], "lr": k.lr_labels}] if k.learn_labels else []))
    sampler = BatchSampler(ctx.source, ctx.cfg.batch, device, ctx.seed + 1)
    losses: list[float] = []
    if hooks.resume is not None:
        with torch.no_grad():
            x_s.copy_(hooks.resume["x_s"])
            y_s.copy_(hooks.resume["y_s"])
        opt.load_state_dict(hooks.resume["opt"])
        sampler.load_state_dict(hooks.resume["sampler"])
        losses = list(hooks.resume["losses"])

    def finish(step: int, loss: list[float], _: object) -> float:
        if not math.isfinite(loss[0]):
            raise UserError(f"distill: non-finite KIP loss at step {step}; lower distill.kip.lr_images "
                            "(or distill.kip.lr_labels) or raise distill.kip.ridge (last checkpoint kept)")
        return loss[0]

    log = StepLog(losses, finish, device, tag="loss")  # on a GPU read every few steps, not one sync per step

    def state() -> dict:
        log.read()
        return {"step": len(losses), "x_s": x_s.detach().clone(), "y_s": y_s.detach().clone(),
                "opt": opt.state_dict(), "sampler": sampler.state_dict(), "losses": list(losses)}

    bar = tqdm(range(len(losses), k.steps), desc=f"kip s{ctx.seed}", disable=not ctx.progress, dynamic_ncols=True,
               initial=len(losses), total=k.steps)
    with log.guard():
        for step in bar:
            real = sampler.next_index()
            x_t, y_t = ctx.to_space(sampler.images[real]).contiguous(memory_format=torch.channels_last), targets(real)
            models = feature_models(ctx.spec, k.models, ctx.seed, step, device)
            with torch.no_grad(), autocast(device):
                phi_t = random_features(models, x_t)
            with autocast(device):
                phi_s = random_features(models, x_s)
            loss = kip_loss(phi_s, phi_t, y_s, y_t, k.ridge)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if log.add(step, [loss]):
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            live_log.synthetic(step + 1, k.steps, lambda: ctx.to_unit(x_s))
            hooks.after_step(step + 1, k.steps, state, "distill")
        log.read()

    if k.learn_labels:
        stored, objective = y_s.detach() + 1.0 / labels.num_classes, "mse"
    else:
        stored, objective = labels.one_hot(index).to(device), "cross_entropy"
    counts = torch.bincount(labels.labels[index], minlength=labels.num_classes).tolist()
    return DistilledSet(x_s.detach(), stored, objective=objective,
                        meta={"init_index": index.tolist(), "class_counts": counts, "steps": k.steps,
                              "losses": losses, "kernel": KERNEL, "kernel_models": k.models,
                              "labels": "learned (stored + 1/C, MSE)" if k.learn_labels else "fixed one-hot",
                              "image_change": float((x_s.detach() - x0).abs().mean())})
