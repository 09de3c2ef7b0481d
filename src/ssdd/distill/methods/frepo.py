"""FRePo (Zhou, Nezhadarya & Ba, NeurIPS 2022), labelled: optimises m synthetic images so that a ridge head on
a pool model's features, fitted to their fixed one-hot labels, predicts the labels of real batches (MSE).

It is the KRR-ST engine (:func:`ssdd.distill.engines.krr_engine.distill_krr_st`) with three changes, and nothing else:
targets are class labels instead of teacher features (the real batch's own labels, the synthetic images' labels
from the paired random draw ``ctx.init_index``, so it starts exactly where ``random_subset_labeled`` stays);
the synthetic targets stay fixed (FRePo can learn them; here they are not); the pool models' heads have one
output per class. Followed from FRePo: centred one-hot targets (one-hot - 1/C) for the regression, ridge
lambda = ridge * trace(K_ss) / m, a pool of 10 models each trained online on the synthetic set (MSE to its
labels) and re-initialised after 100 updates, linear decay of the image learning rate to 0.1x.
Left as the engine does it: AdamW on the images (FRePo: LAMB), an SGD pool step (FRePo: Adam 3e-4), a bias
column on the features, crop/flip of the real batch, no ZCA whitening. The stored targets are the one-hot rows
(objective ``cross_entropy``): pre-training learns the classes, as for every labelled set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ssdd.config import Role, positive, roles
from ssdd.distill.engines.krr_engine import DistillResult, distill_krr_st
from ssdd.distill.engines.labels import centred_one_hot
from ssdd.distill.registry import DistillContext, DistilledSet, register, replaced

# the smallest settings of this module's sections that run end to end (tests/test_methods.py)
SMOKE = {"distill.frepo.steps": 2, "distill.frepo.pool_size": 2, "distill.frepo.pool_max_age": 2}


@dataclass
class FrepoConfig:
    """FRePo (Zhou et al., NeurIPS 2022) with fixed one-hot labels, run on the KRR-ST engine (see
    ``ssdd.distill.methods.frepo``); the engine's speed options (chunk, fold_bn, compile) come from distill.krr_st."""

    steps: int = 500_000
    lr_images: float = 3e-4  # FRePo: LAMB at 3e-4; the engine's AdamW here
    final_lr_ratio: float = 0.1  # FRePo decays by cosine to 0.1x; the engine decays linearly
    ridge: float = 1e-6  # lambda = ridge * trace(K_ss) / m (FRePo)
    pool_size: int = 10
    pool_max_age: int = 100  # online updates before a pool model is re-initialised (FRePo)
    pool_lr: float = 0.1  # the engine's SGD pool step (FRePo trains its pool with Adam at 3e-4)
    pool_momentum: float = 0.9
    pool_weight_decay: float = 1e-3
    ROLES: ClassVar[dict[str, Role]] = roles("steps lr_images final_lr_ratio ridge pool_size pool_max_age pool_lr pool_momentum pool_weight_decay")

    def check(self, at: str, distill: Any) -> None:
        positive(at, self, "steps pool_size pool_max_age")


def distill_frepo(ctx: DistillContext) -> DistillResult:
    """Run the KRR-ST engine with ``distill.frepo``'s values and label targets (see the module docstring);
    ``result.targets`` are the fixed centred one-hot rows it regressed with."""
    labels = ctx.require_labels("frepo")
    f = ctx.cfg.frepo
    engine = dataclasses.replace(  # the engine's lambda is ridge * trace(K_ss), FRePo's ridge * trace(K_ss) / m
        ctx.cfg.krr_st, steps=f.steps, lr_images=f.lr_images, final_lr_ratio=f.final_lr_ratio,
        ridge=f.ridge / len(ctx.init_index), pool_size=f.pool_size, pool_max_age=f.pool_max_age, pool_reset="fixed",
        pool_lr=f.pool_lr, pool_momentum=f.pool_momentum, pool_weight_decay=f.pool_weight_decay)
    run = dataclasses.replace(ctx, spec={**ctx.spec, "out_dim": labels.num_classes},
                              cfg=replaced(ctx.cfg, krr_st=engine))
    return distill_krr_st(run, targets_of=centred_one_hot(labels, ctx.device), learn_targets=False)


@register("frepo", config=FrepoConfig, needs=("distill.krr_st",))
def frepo(ctx: DistillContext) -> DistilledSet:
    """FRePo with fixed labels: the KRR-ST engine regressing one-hot labels of real batches."""
    labels = ctx.require_labels("frepo")
    result = distill_frepo(ctx)
    return DistilledSet(result.images, labels.one_hot(result.init_index).to(ctx.device), objective="cross_entropy",
                        meta={"init_index": result.init_index.tolist(), "steps": ctx.cfg.frepo.steps,
                              "losses": result.losses, "pool_reinits": result.pool_reinits,
                              "labels": "fixed one-hot of the paired random draw",
                              "kernel": "linear kernel on pool-model features (with a bias column), as KRR-ST"})
