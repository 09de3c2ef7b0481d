"""Baselines that select real images instead of optimising them, and the two encoder baselines.

``random_subset`` is the baseline every number stands beside: the same m images the seed's
distillations start from (the paired draw ``ctx.init_index``), with teacher features as targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ssdd.config import Role, positive, roles
from ssdd.distill.registry import DistillContext, DistilledSet, register

# the smallest settings of this module's sections that run end to end (tests/test_methods.py)
# (random_subset, random_subset_labeled and random_ssl have nothing to shrink)
SMOKE = {"distill.kmeans.n_init": 1}


def _subset(ctx: DistillContext, index: torch.Tensor, **meta) -> DistilledSet:
    return DistilledSet(ctx.to_space(ctx.source.images[index]), ctx.targets_for(index),
                        meta={"init_index": index.tolist(), **meta})


@register("random_subset")
def random_subset(ctx: DistillContext) -> DistilledSet:
    """The seed's paired random draw of m real images with teacher targets."""
    return _subset(ctx, ctx.init_index)


@register("random_subset_labeled")
def random_subset_labeled(ctx: DistillContext) -> DistilledSet:
    """The seed's paired random draw of m real images with their one-hot class labels (cross-entropy)."""
    labels = ctx.require_labels("random_subset_labeled")
    index = ctx.init_index
    return DistilledSet(ctx.to_space(ctx.source.images[index]), labels.one_hot(index).to(ctx.device),
                        objective="cross_entropy", meta={"init_index": index.tolist()})


@register("random_ssl")
def random_ssl(ctx: DistillContext) -> DistilledSet:
    """The same random draw, pre-trained by Barlow Twins instead of teacher targets: what does the teacher add?"""
    index = ctx.init_index
    return DistilledSet(ctx.to_space(ctx.source.images[index]), None, objective="barlow_twins",
                        meta={"init_index": index.tolist()})


@dataclass
class KmeansConfig:
    """MiniBatchKMeans on teacher features; the real image nearest each centroid."""

    batch_size: int = 1024
    n_init: int = 3
    max_iter: int = 100
    ROLES: ClassVar[dict[str, Role]] = roles("batch_size n_init max_iter")

    def check(self, at: str, distill: Any) -> None:
        positive(at, self, "batch_size n_init max_iter")


@register("kmeans", config=KmeansConfig)
def kmeans(ctx: DistillContext) -> DistilledSet:
    """MiniBatchKMeans with m clusters on teacher features; the real image nearest each centroid."""
    from sklearn.cluster import MiniBatchKMeans

    feats = ctx.teacher_features().float().cpu().numpy()
    k = ctx.cfg.kmeans
    km = MiniBatchKMeans(n_clusters=ctx.cfg.m, batch_size=max(k.batch_size, ctx.cfg.m), n_init=k.n_init,
                         max_iter=k.max_iter, random_state=ctx.seed).fit(feats)
    # nearest real image to each centroid, each image used at most once (greedy by distance)
    dist = ((feats ** 2).sum(1)[None, :] - 2 * km.cluster_centers_ @ feats.T
            + (km.cluster_centers_ ** 2).sum(1)[:, None])
    taken, chosen = np.zeros(len(feats), bool), []
    for c in np.argsort(dist.min(1)):
        order = np.argsort(dist[c])
        pick = next(i for i in order if not taken[i])
        taken[pick] = True
        chosen.append(int(pick))
    index = torch.tensor(sorted(chosen), dtype=torch.long)
    return _subset(ctx, index, inertia=float(km.inertia_))


# Encoder baselines: no set; the pipeline builds their encoders (random init per seed / the teacher).
register("no_pretrain", kind="encoder")(None)
register("full_ssl", kind="encoder")(None)
