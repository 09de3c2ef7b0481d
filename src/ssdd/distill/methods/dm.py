"""DM (Zhao & Bilen, WACV 2023), a labelled baseline: synthetic images whose mean embedding per class,
under a freshly initialised network each iteration and siamese DSA augmentation, matches the mean
embedding of that class's real images (sum over classes of the squared distance between the means)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from ssdd import live_log
from ssdd.config import Role, positive, roles
from ssdd.data import siamese_augment as dsa_aug
from ssdd.data.device_data import upload
from ssdd.distill.engines.per_class import ClassBatches, ImageOptimisation, balanced_start
from ssdd.distill.engines.seeding import build_seeded, expert_seed
from ssdd.distill.registry import DistillContext, DistilledSet, register
from ssdd.errors import UserError
from ssdd.loss_log import StepLog

# the smallest settings of this module's sections that run end to end (tests/test_methods.py)
SMOKE = {"distill.dm.iterations": 2, "distill.dm.batch_real": 4}

REAL_CHUNK = 4096  # real images per forward pass (bounds memory; the means are exact sums)


@dataclass
class DmConfig:
    """DM (Zhao & Bilen, WACV 2023), labelled: per class, the mean embedding of the synthetic images matches
    the real images' under a freshly initialised network each iteration. Published values (32 px, ConvNet-3)."""

    iterations: int = 20_000
    lr_images: float = 1.0  # SGD on the images
    momentum: float = 0.5
    batch_real: int = 256  # real images per class per iteration (all of a smaller class)
    augment: str = "color_crop_cutout_flip_scale_rotate"  # DSA operations (one per class and iteration); "none"
    ROLES: ClassVar[dict[str, Role]] = roles("iterations lr_images momentum batch_real augment")

    def check(self, at: str, distill: Any) -> None:
        positive(at, self, "iterations batch_real")
        dsa_aug.parse_strategy(self.augment, f"{at}.augment")  # an unknown operation: refused at load


def class_means(features: torch.Tensor, group: torch.Tensor, groups: int,
                counts: torch.Tensor | None = None) -> torch.Tensor:
    """(groups, D) mean feature of each group (zero for an empty group). ``counts``: the group sizes, when
    the caller has them (a device ``bincount`` waits for the device to size its output)."""
    sums = features.new_zeros(groups, features.shape[1]).index_add(0, group, features)
    counts = torch.bincount(group, minlength=groups) if counts is None else counts
    return sums / counts.clamp_min(1).to(features.dtype)[:, None]


def mean_embedding_distance(real_means: torch.Tensor, syn_features: torch.Tensor,
                            syn_group: torch.Tensor, syn_counts: torch.Tensor | None = None) -> torch.Tensor:
    """DM's loss: sum over classes c of ||real_means[c] - mean of the synthetic features of class c||^2."""
    return (real_means - class_means(syn_features, syn_group, len(real_means), syn_counts)).pow(2).sum()


@torch.no_grad()
def real_class_means(net: torch.nn.Module, ctx: DistillContext, source_u8: torch.Tensor, index: torch.Tensor,
                     group: torch.Tensor, params: dsa_aug.AugParams, groups: int) -> torch.Tensor:
    """Mean embedding of each class's augmented real batch, ``REAL_CHUNK`` images per pass. ``index`` and
    ``group`` are CPU tensors (as :class:`ClassBatches` draws them): the group sizes and the augmentation's
    masks are counted on the host, and each chunk's indices reach the device in one copy."""
    index, group = index.cpu(), group.cpu()
    sums = None
    for i in range(0, len(index), REAL_CHUNK):
        g_host = group[i:i + REAL_CHUNK]
        idx, g = upload(torch.stack([index[i:i + REAL_CHUNK], g_host]), source_u8.device).unbind(0)
        x = dsa_aug.apply(ctx.to_space(source_u8[idx]), params, g_host)
        f = net.features(x)
        part = f.new_zeros(groups, f.shape[1]).index_add(0, g.to(f.device), f)
        sums = part if sums is None else sums + part
    counts = upload(torch.bincount(group, minlength=groups), sums.device)
    return sums / counts.clamp_min(1).to(sums.dtype)[:, None]


@register("dm", config=DmConfig)
def distill_dm(ctx: DistillContext) -> DistilledSet:
    """DM: class-balanced real images moved so their per-class mean embedding matches the real images'.

    Start: ``distill.m`` real images spread evenly over the classes (see :func:`balanced_start`: fewer
    images than classes = a seeded random choice of classes). Each iteration builds a new network
    (``model`` spec, one output per class; its features before the classifier are the embedding; train
    mode as published, so BatchNorm uses batch statistics of each real chunk), draws one DSA augmentation
    per class applied to that class's real batch and synthetic images alike, and takes one SGD step on
    the images. Returns one-hot labels for cross-entropy pre-training.
    """
    cfg, hooks, device = ctx.cfg.dm, ctx.hooks, ctx.device
    labels = ctx.require_labels("dm")
    ops = dsa_aug.parse_strategy(cfg.augment, "distill.dm.augment")
    start = balanced_start(labels.labels, ctx.cfg.m, expert_seed(ctx.seed, 0, "dm-init"))
    k = len(start.classes)
    source_u8 = ctx.source.images.to(device)
    syn_group = upload(start.group, device)  # start.group (CPU) decides the augmentation's masks
    syn_counts = upload(torch.bincount(start.group, minlength=k), device)
    run = ImageOptimisation.start(ctx.to_space(source_u8[upload(start.index, device)]), cfg.lr_images,
                                  cfg.momentum, expert_seed(ctx.seed, 0, "dm-draws"), hooks.resume)
    x_s, opt, gen = run.x_s, run.opt, run.gen

    def finish(it: int, loss: list[float], _: object) -> float:
        if not math.isfinite(loss[0]):
            raise UserError(f"dm: non-finite loss at iteration {it}; lower distill.dm.lr_images")
        return loss[0] / k  # per class, as the published log

    log = StepLog(run.losses, finish, device, tag="loss")  # on a GPU read every few iterations, not one sync each

    def state() -> dict:
        log.read()
        return run.state()

    batches = ClassBatches(labels.labels, start.classes)
    spec = {**ctx.spec, "out_dim": labels.num_classes}
    size = x_s.shape[-1]
    bar = tqdm(range(len(log), cfg.iterations), desc="dm", disable=not ctx.progress, dynamic_ncols=True,
               initial=len(log), total=cfg.iterations)
    with log.guard():
        for it in bar:
            net = build_seeded(spec, expert_seed(ctx.seed, it, "dm-net"), device).train().requires_grad_(False)
            params = dsa_aug.draw(k, ops, size, gen, device=device)
            index, group = batches.sample(cfg.batch_real, gen)
            real_means = real_class_means(net, ctx, source_u8, index, group, params, k)
            syn_features = net.features(dsa_aug.apply(x_s, params, start.group))
            loss = mean_embedding_distance(real_means, syn_features, syn_group, syn_counts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if log.add(it, [loss]):
                bar.set_postfix(loss=f"{log.values[-1]:.4g}", refresh=False)
            live_log.synthetic(it + 1, cfg.iterations, lambda: ctx.to_unit(x_s))
            hooks.after_step(it + 1, cfg.iterations, state, "dm")
        log.read()
    losses = log.values
    return DistilledSet(x_s.detach(), labels.one_hot(start.index).to(device), objective="cross_entropy",
                        meta={"init": "real_class_balanced", "init_index": start.index.tolist(),
                              "classes": start.classes.tolist(), "iterations": cfg.iterations, "augment": list(ops),
                              "losses": losses})
