"""DSA (Zhao & Bilen, ICML 2021), a labelled baseline: synthetic images whose cross-entropy gradients
on a network match, layer by layer and class by class, those of real images under the same (siamese)
differentiable augmentation, while that network trains on the synthetic set between matching steps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ssdd import live_log
from ssdd.config import Role, nonnegative, positive, roles
from ssdd.data import siamese_augment as dsa_aug
from ssdd.data.augment import check_generator
from ssdd.data.device_data import upload
from ssdd.distill.engines.per_class import ClassBatches, ImageOptimisation, balanced_start
from ssdd.distill.engines.seeding import build_seeded, expert_seed
from ssdd.distill.registry import DistillContext, DistilledSet, register
from ssdd.errors import UserError
from ssdd.loss_log import StepLog

# the smallest settings of this module's sections that run end to end (tests/test_methods.py)
SMOKE = {"distill.dsa.iterations": 2, "distill.dsa.batch_real": 4}

# The published outer/inner loops by images per class (DC/DSA's get_loops): the outer loop always equals ipc.
PUBLISHED_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


@dataclass
class DsaConfig:
    """DSA (Zhao & Bilen, ICML 2021), labelled: gradient matching with differentiable siamese augmentation.
    Published values (32 px, ConvNet-3)."""

    iterations: int = 1000
    lr_images: float = 0.1  # SGD on the images
    momentum: float = 0.5
    batch_real: int = 256  # real images per class per outer step (all of a smaller class)
    net_lr: float = 0.01  # SGD of the network between outer steps
    net_momentum: float = 0.0  # the DC/DSA script's; DC's later stand-alone script uses 0.5
    batch_train: int = 256  # synthetic images per step of that network training
    outer_loop: int = 0  # 0 = by images per class as published: 1 -> 1, 10 -> 10, 20 -> 20, ... 50 -> 50
    inner_loop: int = 0  # 0 = by images per class as published: 1 -> 1, 10 -> 50, 20 -> 25, 30 -> 20, 40 -> 15, 50 -> 10
    augment: str = "color_crop_cutout_flip_scale_rotate"  # DSA operations (one per class and step); "none"
    ROLES: ClassVar[dict[str, Role]] = roles("iterations lr_images momentum batch_real net_lr net_momentum batch_train outer_loop inner_loop augment")

    def check(self, at: str, distill: Any) -> None:
        positive(at, self, "iterations batch_real batch_train")
        nonnegative(at, self, "outer_loop inner_loop")
        dsa_aug.parse_strategy(self.augment, f"{at}.augment")  # an unknown operation: refused at load


def gradient_distance(real: Sequence[torch.Tensor], syn: Sequence[torch.Tensor]) -> torch.Tensor:
    """DSA's layer-wise distance: for every layer, the sum over output units of 1 - cosine between the
    real and synthetic gradient rows (a weight reshaped to out x rest). One-dimensional parameters
    (biases, norm scales) count zero, as in the paper's code; 1e-6 keeps a zero gradient finite."""
    total = syn[0].new_zeros(())
    for g_r, g_s in zip(real, syn, strict=True):
        if g_r.ndim < 2:
            continue
        a, b = g_r.reshape(len(g_r), -1), g_s.reshape(len(g_s), -1)
        total = total + (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-6)).sum()
    return total


def loops(cfg: DsaConfig, ipc: int) -> tuple[int, int]:
    """``(outer_loop, inner_loop)``: the configured values, or where 0, the published ones for ``ipc``
    (ipc outside the table: outer = ipc, inner = that of the nearest tabulated ipc, the smaller on a tie)."""
    nearest = min(PUBLISHED_LOOPS, key=lambda n: (abs(n - ipc), n))
    return cfg.outer_loop or ipc, cfg.inner_loop or PUBLISHED_LOOPS[nearest][1]


def class_gradients(net: torch.nn.Module, weights: list[torch.Tensor], x: torch.Tensor, label: int,
                    create_graph: bool) -> tuple[torch.Tensor, ...]:
    """Gradients of the mean cross-entropy of ``x`` (all of class ``label``) w.r.t. ``weights``."""
    target = torch.full((len(x),), label, dtype=torch.long, device=x.device)
    return torch.autograd.grad(F.cross_entropy(net(x), target), weights, create_graph=create_graph)


@register("dsa", config=DsaConfig)
def distill_dsa(ctx: DistillContext) -> DistilledSet:
    """DSA: class-balanced real images moved so their augmented gradients match the real images' layer by layer.

    Start: ``distill.m`` real images spread evenly over the classes (:func:`balanced_start`: fewer images
    than classes = a seeded random choice of classes). Each iteration builds a new network (``model``
    spec, one output per class; train mode throughout, as published for norms without running
    statistics) and runs ``outer_loop`` matching steps: one augmentation drawn per class and applied to
    that class's real batch and its synthetic images alike, the summed layer-wise distance over classes,
    one SGD step on the images; between them, ``inner_loop`` epochs of the network on the (augmented,
    per-image parameters) synthetic set. Returns one-hot labels for cross-entropy pre-training.
    """
    cfg, hooks, device = ctx.cfg.dsa, ctx.hooks, ctx.device
    labels = ctx.require_labels("dsa")
    ops = dsa_aug.parse_strategy(cfg.augment, "distill.dsa.augment")
    start = balanced_start(labels.labels, ctx.cfg.m, expert_seed(ctx.seed, 0, "dsa-init"))
    k = len(start.classes)
    outer, inner = loops(cfg, start.images_per_class)
    source_u8 = ctx.source.images.to(device)
    syn_labels = upload(labels.labels[start.index], device)
    syn_rows = [upload((start.group == j).nonzero().squeeze(1), device) for j in range(k)]
    run = ImageOptimisation.start(ctx.to_space(source_u8[upload(start.index, device)]), cfg.lr_images,
                                  cfg.momentum, expert_seed(ctx.seed, 0, "dsa-draws"), hooks.resume)
    x_s, opt, gen = run.x_s, run.opt, run.gen

    def finish(it: int, outer_losses: list[float], _: object) -> float:
        total = 0.0
        for value in outer_losses:
            if not math.isfinite(value):
                raise UserError(f"dsa: non-finite loss at iteration {it}; lower distill.dsa.lr_images")
            total += value
        return total / (k * outer)  # per class and outer step, as the published log

    log = StepLog(run.losses, finish, device, tag="loss")  # on a GPU read every few iterations, not one sync per step

    def state() -> dict:
        log.read()
        return run.state()

    batches = ClassBatches(labels.labels, start.classes)
    spec = {**ctx.spec, "out_dim": labels.num_classes}
    size = x_s.shape[-1]
    bar = tqdm(range(len(log), cfg.iterations), desc="dsa", disable=not ctx.progress, dynamic_ncols=True,
               initial=len(log), total=cfg.iterations)
    with log.guard():
        for it in bar:
            net = build_seeded(spec, expert_seed(ctx.seed, it, "dsa-net"), device).train()
            weights = [p for p in net.parameters() if p.ndim > 1]  # 1-d parameters count zero in the distance
            net_opt = torch.optim.SGD(net.parameters(), lr=cfg.net_lr, momentum=cfg.net_momentum)
            outer_losses = []
            for ol in range(outer):
                params = dsa_aug.draw(k, ops, size, gen, device=device)
                index, group = batches.sample(cfg.batch_real, gen)  # CPU, grouped by class
                x_syn = dsa_aug.apply(x_s, params, start.group)
                bounds = [0, *torch.bincount(group, minlength=k).cumsum(0).tolist()]
                real_index = upload(index, device)  # the whole real batch in one copy
                loss = x_s.new_zeros(())
                for j, c in enumerate(start.classes.tolist()):
                    rows = slice(bounds[j], bounds[j + 1])  # this class's real batch, augmented by its draw
                    real_j = dsa_aug.apply(ctx.to_space(source_u8[real_index[rows]]), params, group[rows])
                    g_real = [g.detach() for g in class_gradients(net, weights, real_j, c, create_graph=False)]
                    g_syn = class_gradients(net, weights, x_syn[syn_rows[j]], c, create_graph=True)
                    loss = loss + gradient_distance(g_real, g_syn)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                outer_losses.append(loss.detach())
                if ol == outer - 1:
                    break
                train_network(net, net_opt, x_s.detach(), syn_labels, inner, cfg.batch_train, ops, gen)
            if log.add(it, outer_losses):
                bar.set_postfix(loss=f"{log.values[-1]:.4g}", refresh=False)
            live_log.synthetic(it + 1, cfg.iterations, lambda: ctx.to_unit(x_s))
            hooks.after_step(it + 1, cfg.iterations, state, "dsa")
        log.read()
    losses = log.values
    return DistilledSet(x_s.detach(), labels.one_hot(start.index).to(device), objective="cross_entropy",
                        meta={"init": "real_class_balanced", "init_index": start.index.tolist(),
                              "classes": start.classes.tolist(), "iterations": cfg.iterations, "outer_loop": outer,
                              "inner_loop": inner, "augment": list(ops), "losses": losses})


def train_network(net: torch.nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                  epochs: int, batch: int, ops: tuple[str, ...], gen: torch.Generator) -> None:
    """DSA's inner loop: ``epochs`` shuffled epochs of cross-entropy on the synthetic set, each batch
    augmented with per-image parameters and one operation for the batch (published non-siamese mode)."""
    net.train()
    check_generator(gen, gen.device)
    for _ in range(epochs):
        order = upload(torch.randperm(len(images), generator=gen, device=gen.device), images.device)
        for i in range(0, len(images), batch):
            rows = order[i:i + batch]
            params = dsa_aug.draw(len(rows), ops, images.shape[-1], gen, one_op=True, device=images.device)
            loss = F.cross_entropy(net(dsa_aug.apply(images[rows], params)), labels[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
