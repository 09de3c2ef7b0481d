"""How each method's encoders come to be: pre-trained on its distilled set, or one of the two encoder
recipes that make no set (``full_ssl``: the teacher itself, the ceiling; ``no_pretrain``: random weights,
the floor). The one place that knows those two by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from ssdd import pretrain_recipes
from ssdd.config import Config
from ssdd.evaluate.suite import validation_score
from ssdd.distill import registry
from ssdd.models import Encoder, build, encoder_from_artifact, model_spec
from ssdd.pretrain import arch_spec, pretrain_set
from ssdd.run.freshness import Unit, Units


class PlanView(Protocol):  # what a recipe reads of ssdd.run.plan.Plan (which picks the recipes)
    units: Units

    def set_unit(self, method: registry.Method, k: int) -> Unit: ...
    def teacher_is_encoder(self) -> bool: ...


class InputsView(Protocol):  # ... of ssdd.run.inputs.Inputs
    plan: PlanView

    def distilled_set(self, method: registry.Method, k: int) -> Path: ...
    def target_train(self, spec: str) -> Any: ...
    def encoder_file(self, method: registry.Method, k: int, arch: str | None) -> torch.nn.Module: ...
    def source_shape(self) -> tuple[int, int, int]: ...
    def teacher(self, channels: int, size: int) -> tuple[torch.nn.Module, int]: ...
    def teacher_path(self) -> Path: ...


class RunView(Protocol):  # ... of the run
    cfg: Config
    device: torch.device
    progress: bool
    inputs: InputsView


Made = tuple[torch.nn.Module, dict, dict]  # (encoder on the CPU, its build spec, its metadata)


class EncoderRecipe:
    """Pre-training on the method's distilled set: one encoder per seed and architecture."""

    def __init__(self, method: registry.Method):
        self.method = method

    def seeds(self, seeds: range) -> range:
        return seeds

    def archs(self, archs: list[str | None]) -> list[str | None]:
        return archs

    def evaluated_seed(self, k: int) -> int:
        """The encoder seed that evaluation seed ``k`` evaluates."""
        return k

    def writes_file(self, plan: PlanView) -> bool:
        """Whether the pretrain stage writes this encoder's file."""
        return True

    def unit(self, plan: PlanView, k: int, arch: str | None) -> Unit:
        return plan.units.set_encoder(self.method.name, k, arch, plan.set_unit(self.method, k))

    def make(self, run: RunView, k: int, arch: str | None) -> Made:
        set_path, cfg, seed = run.inputs.distilled_set(self.method, k), run.cfg, run.cfg.seed + k
        meta: dict[str, Any] = {"method": self.method.name, "seed": seed, "distilled_set": set_path.name}
        if not pretrain_recipes.choosing(cfg):
            name = cfg.pretrain.recipes[0]
            encoder, curve, spec = pretrain_set(cfg, set_path, seed, run.device, run.progress, arch, name)
            if name != "short":
                meta["recipe"] = name
            return encoder.cpu(), spec, {**meta, "loss_curve": curve}
        # several recipes: keep the encoder whose probe scores best on the choice target's validation split
        train = run.inputs.target_train(pretrain_recipes.choice_target(cfg))
        best, scores = None, {}
        for name in cfg.pretrain.recipes:
            made = pretrain_set(cfg, set_path, seed, run.device, run.progress, arch, name)
            scores[name] = validation_score(made[0], train, cfg.evaluate, seed, run.device)
            if best is None or scores[name] > scores[best[0]]:  # ties: the earlier recipe of the list
                best = (name, made)
        name, (encoder, curve, spec) = best
        return encoder.cpu(), spec, {**meta, "loss_curve": curve, "recipe": name, "recipe_scores": scores,
                                     "recipe_chosen_on": f"{train.name}: validation split of its train split"}

    def load(self, inputs: InputsView, k: int, arch: str | None) -> torch.nn.Module:
        return inputs.encoder_file(self.method, k, arch)


class TeacherRecipe(EncoderRecipe):
    """``full_ssl``: the teacher as the encoder. One encoder, the configured architecture only; every
    evaluation seed evaluates it (the seeds vary the evaluation's draws)."""

    def seeds(self, seeds: range) -> range:
        return range(1)

    def archs(self, archs: list[str | None]) -> list[str | None]:
        return [None]

    def evaluated_seed(self, k: int) -> int:
        return 0

    def writes_file(self, plan: PlanView) -> bool:
        return plan.teacher_is_encoder()  # a TorchScript teacher is evaluated from its own file

    def unit(self, plan: PlanView, k: int, arch: str | None) -> Unit:
        return plan.units.teacher_encoder(self.method.name)

    def make(self, run: RunView, k: int, arch: str | None) -> Made:
        encoder, meta = encoder_from_artifact(run.inputs.teacher_path(), "cpu")
        return encoder, meta["model_spec"], {"method": self.method.name, "seed": run.cfg.seed + k}

    def load(self, inputs: InputsView, k: int, arch: str | None) -> torch.nn.Module:
        if inputs.plan.teacher_is_encoder():
            return super().load(inputs, k, arch)
        c, h, _ = inputs.source_shape()
        teacher, dim = inputs.teacher(c, h)
        return Encoder(teacher, dim, 0).eval()


class RandomRecipe(EncoderRecipe):
    """``no_pretrain``: the student at its seeded random initialisation."""

    def unit(self, plan: PlanView, k: int, arch: str | None) -> Unit:
        return plan.units.random_encoder(self.method.name, k, arch)

    def make(self, run: RunView, k: int, arch: str | None) -> Made:
        c, h, _ = run.inputs.source_shape()
        spec: dict[str, Any] = {**(model_spec(run.cfg.model, c, h, 0) if arch is None else arch_spec(arch, c, h)),
                                "out_dim": 0}
        torch.manual_seed(run.cfg.seed + k)
        return build(spec), spec, {"method": self.method.name, "seed": run.cfg.seed + k}


RECIPES = {"full_ssl": TeacherRecipe, "no_pretrain": RandomRecipe}  # every kind="encoder" method


def recipe_for(method: registry.Method) -> EncoderRecipe:
    if method.kind == "encoder":
        return RECIPES[method.name](method)
    return EncoderRecipe(method)
