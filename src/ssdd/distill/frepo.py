"""FRePo (Zhou, Nezhadarya & Ba, NeurIPS 2022), labelled: optimises m synthetic images so that a ridge head on
a pool model's features, fitted to their fixed one-hot labels, predicts the labels of real batches (MSE).

It is the KRR-ST engine (:func:`ssdd.distill.krr_st.distill_krr_st`) with three changes, and nothing else:
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
from typing import Callable

import torch

from ssdd.distill.krr_st import DistillResult, distill_krr_st
from ssdd.distill.registry import DistillContext, DistilledSet, SourceLabels, register


def centred_one_hot(labels: SourceLabels, device: torch.device | str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``index -> one_hot(labels[index]) - 1/C`` on ``device``: the regression targets of FRePo and KIP
    (centring makes an all-zero prediction the uninformed one). Made on ``device`` from the labels kept
    there, so a device ``index`` (a real batch, every step) never goes back to the host."""
    def targets(index: torch.Tensor) -> torch.Tensor:
        return labels.one_hot(index, device) - 1.0 / labels.num_classes
    return targets


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
                              cfg=dataclasses.replace(ctx.cfg, krr_st=engine))
    return distill_krr_st(run, targets_of=centred_one_hot(labels, ctx.device), learn_targets=False)


@register("frepo", needs=("distill.frepo", "distill.krr_st"))
def frepo(ctx: DistillContext) -> DistilledSet:
    """FRePo with fixed labels: the KRR-ST engine regressing one-hot labels of real batches."""
    labels = ctx.require_labels("frepo")
    result = distill_frepo(ctx)
    return DistilledSet(result.images, labels.one_hot(result.init_index).to(ctx.device), objective="cross_entropy",
                        meta={"init_index": result.init_index.tolist(), "steps": ctx.cfg.frepo.steps,
                              "losses": result.losses, "pool_reinits": result.pool_reinits,
                              "labels": "fixed one-hot of the paired random draw",
                              "kernel": "linear kernel on pool-model features (with a bias column), as KRR-ST"})
