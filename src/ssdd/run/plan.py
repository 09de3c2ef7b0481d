"""What a run makes: its units (sets, encoders, evaluations) for the configured methods, seeds, architectures
and targets, and each unit's inputs (:mod:`ssdd.run.freshness`). Reads no artifact."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ssdd import layout
from ssdd.config import Config
from ssdd.distill import registry
from ssdd.evaluate import Target
from ssdd.run.encoders import EncoderRecipe, recipe_for
from ssdd.run.freshness import Unit, Units
from ssdd.teacher import is_torchscript


@dataclasses.dataclass
class EvalUnit:
    """One (encoder, target) evaluation: its place in results.json, what it evaluates, where it goes."""

    order: int
    method: registry.Method
    k: int
    enc_k: int
    arch: str | None
    group: str
    target: Target | str  # its spec until the stage has loaded it
    path: Path
    unit: Unit


class Plan:
    def __init__(self, cfg: Config, precision: str, out: Path, methods: list[registry.Method]):
        self.cfg, self.out, self.methods = cfg, out, methods
        self.units = Units(cfg, precision, out)
        self.target_names = layout.unique_target_names(cfg.data.targets)

    def seeds(self) -> range:
        return range(self.cfg.evaluate.seeds)

    def set_methods(self) -> list[registry.Method]:
        return [m for m in self.methods if m.kind == "set"]

    def recipe(self, method: registry.Method) -> EncoderRecipe:
        return recipe_for(method)

    def archs(self, method: registry.Method) -> list[str | None]:
        """None (the configured student, ``model.arch``) and the extra architectures to transfer to."""
        return self.recipe(method).archs([None, *self.cfg.pretrain.archs])

    def encoder_seeds(self, method: registry.Method) -> range:
        return self.recipe(method).seeds(self.seeds())

    def teacher_is_encoder(self) -> bool:
        """An ssdd encoder (trained here, or brought as one); False for a TorchScript teacher."""
        return not (self.cfg.teacher.path and is_torchscript(Path(self.cfg.teacher.path)))

    def teacher_file(self) -> Path:
        return layout.teacher_path(self.out, self.teacher_is_encoder())

    def active_preps(self, method: registry.Method) -> list[str]:
        """The method's preparatory stages that this config switches on (optional ones may be off)."""
        return [p for p in method.prep if registry.get_prep(p).enabled(self.cfg.distill)]

    # ---- units --------------------------------------------------------------------------
    def prep_unit(self, name: str) -> Unit:
        return self.units.prep(name, registry.get_prep(name).needs)

    def set_unit(self, method: registry.Method, k: int) -> Unit:
        return self.units.set(method, k, {name: self.prep_unit(name) for name in self.active_preps(method)})

    def encoder_unit(self, method: registry.Method, k: int, arch: str | None) -> Unit:
        return self.recipe(method).unit(self, k, arch)

    def evaluation_units(self) -> list[EvalUnit]:
        """Every (encoder, target) unit in results.json order; ``target`` is the target's spec here."""
        cfg, out = self.cfg, []
        for arch in [None, *cfg.pretrain.archs]:
            group = arch or cfg.model.arch  # the table compares methods within a group
            protocols = list(cfg.evaluate.protocols) if arch is None else ["finetune"]
            for method in self.methods:
                if arch not in self.archs(method):
                    continue
                for k in self.seeds():
                    enc_k = self.recipe(method).evaluated_seed(k)
                    encoder = self.encoder_unit(method, enc_k, arch)
                    for spec in cfg.data.targets:
                        path = layout.evaluation_path(self.out, group, method.name, k, self.target_names[spec])
                        unit = self.units.evaluation(method.name, k, enc_k, arch, spec, encoder, protocols)
                        out.append(EvalUnit(len(out), method, k, enc_k, arch, group, spec, path, unit))
        return out

    def kd_unit(self) -> Unit:
        return self.units.kd([(m.name, k, self.set_unit(m, k), self.encoder_unit(m, k, None))
                              for m in self.set_methods() for k in self.seeds()])

    def stage_units(self, stage: str) -> list[Unit]:
        """The units a stage makes (their fingerprints make the stage's)."""
        u = self.units
        if stage == "prepare":
            return [u.source(), *(u.target(t) for t in self.cfg.data.targets)]
        if stage == "teacher":
            return [u.teacher()]
        if stage == "distill":
            return [self.set_unit(m, k) for m in self.set_methods() for k in self.seeds()]
        if stage == "pretrain":
            return [self.encoder_unit(m, k, a) for m in self.methods for a in self.archs(m)
                    for k in self.encoder_seeds(m)]
        units = [unit.unit for unit in self.evaluation_units()]
        if "kd" in self.cfg.evaluate.protocols:
            units.append(self.kd_unit())
        return units  # evaluate, and the report made from it
