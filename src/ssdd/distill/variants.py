"""Our variants beyond MKDT (issue 8), each a recombination of the engines above:

- ``krr_st_experts``: KRR-ST whose pool is the KD experts' parameter snapshots (every expert, every
  saved epoch) instead of fresh networks trained on the synthetic set. The kernel KRR-ST matches is
  then the one of networks that learn the teacher from real data, and the pool costs no SGD steps.
- ``mkdt_aug``: MKDT matched to augmentation-consistent experts (each expert regresses the teacher's
  features of the very crop/flip view it sees), whose trajectories should carry more of the teacher
  than experts that see each image in one fixed view. Its experts are a prep stage of their own.
"""

from __future__ import annotations

import dataclasses
import random

import torch

from ssdd.data.device_data import upload
from ssdd.distill.experts import train_experts
from ssdd.distill.krr_st import distill_krr_st
from ssdd.distill.mkdt import distill_mkdt, mkdt_preflight
from ssdd.distill.registry import DistillContext, DistilledSet, register, register_prep
from ssdd.distill.trajectory import load_flat_params
from ssdd.errors import UserError
from ssdd.models import Encoder, build


class ExpertPool:
    """The pool interface of :class:`ssdd.distill.pool.ModelPool` over fixed expert snapshots: a pick
    loads one (expert, epoch) parameter vector into the one model; training steps do nothing."""

    def __init__(self, spec: dict, trajectories: torch.Tensor, device: torch.device | str, seed: int):
        self.trajectories, self.device = trajectories, device
        self.model: Encoder = build(spec).to(device)
        if sum(p.numel() for p in self.model.parameters()) != trajectories.shape[-1]:
            raise UserError("krr_st_experts: the experts were trained with another model than `model`; "
                            "delete distilled/prep/experts.safetensors or keep the model config")
        self.models = [self.model]
        self.rng = random.Random(seed)
        self.reinits = 0

    def populate(self, x_s: torch.Tensor, y_s: torch.Tensor) -> None:
        pass

    def pick(self) -> int:
        expert = self.rng.randrange(self.trajectories.shape[0])
        epoch = self.rng.randrange(self.trajectories.shape[1])
        # one parameter row per step: pinned and non-blocking on a GPU (the trajectories stay pageable)
        load_flat_params(self.model, upload(self.trajectories[expert, epoch], self.device))
        return 0

    def train_step(self, idx: int, x_s: torch.Tensor, y_s: torch.Tensor) -> float:
        return 0.0

    def state_dict(self) -> dict:
        version, state, gauss = self.rng.getstate()
        return {"rng": list(state), "rng_version": version, "rng_gauss": gauss}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate((state["rng_version"], tuple(state["rng"]), state["rng_gauss"]))


@register("krr_st_experts", needs=("distill.krr_st", "distill.experts"), prep=("experts", "teacher_views"))
def krr_st_experts(ctx: DistillContext) -> DistilledSet:
    """KRR-ST with the KD experts' snapshots as its model pool."""
    pool = ExpertPool(ctx.spec, ctx.prep["experts"]["trajectories"], ctx.device, ctx.seed)
    result = distill_krr_st(ctx, pool=pool)
    return DistilledSet(result.images, result.targets, meta={"init_index": result.init_index.tolist(),
                                                             "steps": ctx.cfg.krr_st.steps, "losses": result.losses})


@register_prep("experts_aug", needs=("distill.experts",))
def train_augmented_experts(ctx: DistillContext) -> dict[str, torch.Tensor]:
    """The KD experts, trained on crop/flip views with the teacher's features of each view."""
    cfg = dataclasses.replace(ctx.cfg, experts=dataclasses.replace(ctx.cfg.experts, augment=True))
    return train_experts(dataclasses.replace(ctx, cfg=cfg))


@register("mkdt_aug", needs=("distill.mkdt", "distill.experts"), prep=("experts_aug",), preflight=mkdt_preflight)
def mkdt_aug(ctx: DistillContext) -> DistilledSet:
    """MKDT matched to augmentation-consistent experts."""
    result = distill_mkdt(dataclasses.replace(ctx, prep={"experts": ctx.prep["experts_aug"]}))
    result.meta["experts"] = "augmentation-consistent"
    return result
