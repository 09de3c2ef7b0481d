"""The model pool: P feature extractors of different ages whose kernels KRR-ST matches.

Each pick trains the model one SGD step on the synthetic set. ``reset="fixed"`` (default): a model
that reaches ``max_age`` steps is re-initialised right after that step and its age restarts at 0.
``reset="reference"`` follows the reference code exactly: the step *after* a model reached
``max_age`` re-initialises it instead of training it, and the counter is never reset, so from then
on that model is re-initialised (untrained) on every pick.

:class:`ExpertPool` has the same interface over fixed expert snapshots (method ``krr_st_experts``).
"""

from __future__ import annotations

import random
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ssdd.data.device_data import upload
from ssdd.distill.engines.trajectory import load_flat_params
from ssdd.errors import UserError
from ssdd.models import Encoder, build
from ssdd.precision import autocast, full_precision


class ModelPool:
    def __init__(self, spec: dict[str, Any], size: int, max_age: int, reset: str = "fixed", lr: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 1e-3, device: torch.device | str = "cpu",
                 seed: int = 0, chunk: int = 0, forward: Callable[[Encoder, torch.Tensor], torch.Tensor] | None = None):
        """``chunk`` > 0 splits the SGD step over the synthetic set into chunks of that many images with
        accumulated gradients (BatchNorm statistics then come per chunk): the memory bound for large m.
        ``forward(model, x)`` replaces ``model(x)`` in the SGD step (a compiled call)."""
        if reset not in ("fixed", "reference"):
            raise ValueError(f"reset must be 'fixed' or 'reference', got {reset!r}")
        self.spec, self.size, self.max_age, self.reset, self.chunk = spec, size, max_age, reset, chunk
        self.forward = forward or (lambda model, x: model(x))
        self.opt_args = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.device = device
        self.rng = random.Random(seed)
        self.models: list[Encoder] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.ages: list[int] = []  # the step counter that decides re-initialisation
        self.trained: list[int] = []  # SGD steps since the model's last (re-)initialisation
        self.reinits = 0

    def _fresh(self) -> tuple[Encoder, torch.optim.Optimizer]:
        model = build(self.spec).to(self.device)
        return model, torch.optim.SGD(model.parameters(), **self.opt_args)

    def add(self, model: Encoder) -> int:
        """Adopt a model at age 0 (with a fresh optimizer); returns its index."""
        self.models.append(model.to(self.device))
        self.optimizers.append(torch.optim.SGD(model.parameters(), **self.opt_args))
        self.ages.append(0)
        self.trained.append(0)
        return len(self.models) - 1

    def populate(self, x_s: torch.Tensor, y_s: torch.Tensor) -> None:
        """Create the P models, each trained a random number of steps in [1, max_age)."""
        for _ in range(self.size):
            idx = self.add(build(self.spec))
            for _ in range(self.rng.randrange(1, max(2, self.max_age))):
                self._sgd_step(idx, x_s, y_s)

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: weights, optimizer moments, ages, the pick RNG."""
        return {"models": [m.state_dict() for m in self.models], "optimizers": [o.state_dict() for o in self.optimizers],
                "ages": list(self.ages), "trained": list(self.trained), "reinits": self.reinits,
                "rng": list(self.rng.getstate()[1]), "rng_version": self.rng.getstate()[0],
                "rng_gauss": self.rng.getstate()[2]}

    def load_state_dict(self, state: dict) -> None:
        self.models, self.optimizers, self.ages, self.trained = [], [], [], []
        for model_state, opt_state, age in zip(state["models"], state["optimizers"], state["ages"]):
            idx = self.add(build(self.spec))
            self.models[idx].load_state_dict(model_state)
            self.optimizers[idx].load_state_dict(opt_state)
            self.ages[idx] = int(age)
        self.trained = [int(t) for t in state.get("trained", self.ages)]
        self.reinits = int(state["reinits"])
        self.rng.setstate((state["rng_version"], tuple(state["rng"]), state["rng_gauss"]))

    def pick(self) -> int:
        return self.rng.randrange(self.size)

    def _sgd_step(self, idx: int, x_s: torch.Tensor, y_s: torch.Tensor) -> torch.Tensor:
        model, opt = self.models[idx], self.optimizers[idx]
        model.train()
        x_s, y_s = x_s.detach(), y_s.detach()
        chunk = self.chunk if 0 < self.chunk < len(x_s) else len(x_s)
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=x_s.device)  # on the device: no wait for the GPU per chunk
        for i in range(0, len(x_s), chunk):
            with autocast(self.device):
                out = self.forward(model, x_s[i:i + chunk])
            with full_precision(self.device):  # the mean over the whole set, accumulated chunk by chunk
                loss = F.mse_loss(out.float(), y_s[i:i + chunk].float(), reduction="sum") / y_s.numel()
            loss.backward()
            total += loss.detach()
        opt.step()
        self.ages[idx] += 1
        self.trained[idx] += 1
        return total

    def _reinit(self, idx: int) -> None:
        self.models[idx], self.optimizers[idx] = self._fresh()
        self.trained[idx] = 0
        self.reinits += 1

    def train_step(self, idx: int, x_s: torch.Tensor, y_s: torch.Tensor) -> torch.Tensor | None:
        """The pool update after model ``idx`` served the outer loss: one SGD step of it on
        MSE(model(x_s), y_s), or its re-initialisation (see the module docstring). Returns the
        step's loss (a 0-d tensor on the device), or None when the model was re-initialised instead."""
        if self.reset == "reference" and self.ages[idx] >= self.max_age:
            self._reinit(idx)
            return None
        loss = self._sgd_step(idx, x_s, y_s)
        if self.reset == "fixed" and self.ages[idx] >= self.max_age:
            self._reinit(idx)
            self.ages[idx] = 0
        return loss


class ExpertPool:
    """The pool interface of :class:`ModelPool` over fixed expert snapshots: a pick
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
