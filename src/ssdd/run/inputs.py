"""Readers of a run's upstream artifacts. Each checks first that the artifact was made for this config
(:func:`ssdd.run.freshness.require`): a stage run alone on a stale upstream stops in one line naming the file
and the command that makes it again, instead of stamping old work with the new config."""

from __future__ import annotations

from pathlib import Path

import torch

import ssdd.run.freshness as freshness
from ssdd import artifacts, layout
from ssdd.data import ImageSet, Normalizer, load_dataset
from ssdd.distill import registry
from ssdd.distill.registry import SourceLabels
from ssdd.evaluate import Target
from ssdd.models import encoder_from_artifact
from ssdd.run.plan import Plan
from ssdd.teacher import as_teacher, load_teacher


class Inputs:
    def __init__(self, plan: Plan, out: Path, device: torch.device):
        self.plan, self.out, self.device = plan, out, device

    def source(self, part: str) -> ImageSet:
        """The prepared source: ``train`` (what distillation draws from) or ``heldout``."""
        path = layout.source_path(self.out, part)
        freshness.require(path, self.plan.units.source(), "ssdd prepare")
        return load_dataset(path)

    def norm(self, train: ImageSet) -> Normalizer:
        """Real and synthetic images share the source's normalised space."""
        return Normalizer(*train.mean_std(), device=self.device)

    def source_shape(self) -> tuple[int, int, int]:
        shapes = artifacts.tensor_shapes(layout.source_path(self.out, "train"))
        return tuple(shapes["images"][1:])  # type: ignore[return-value]

    def labels(self) -> SourceLabels | None:
        """The source's labels, for the labelled baselines (None for an unlabelled source)."""
        path = layout.source_labels_path(self.out)
        if not path.is_file():
            return None
        tensors, meta = artifacts.load_tensors(path)
        return SourceLabels(tensors["labels"], int(meta["num_classes"]), list(meta.get("class_names", [])))

    def teacher_path(self) -> Path:
        path = self.plan.teacher_file()
        freshness.require(path, self.plan.units.teacher(), "ssdd teacher")
        return path

    def teacher(self, channels: int, size: int) -> tuple[torch.nn.Module, int]:
        """(teacher module, feature dimension) on the run's device."""
        path = self.teacher_path()
        if self.plan.teacher_is_encoder():
            teacher, dim, _ = load_teacher(path, channels, size, self.device)
            return teacher, dim
        return as_teacher(torch.jit.load(str(path), map_location=self.device), channels, size, str(path), self.device)

    def targets(self) -> dict[str, Target]:
        """Every target by spec, train and test."""
        return {spec: Target(self.plan.target_names[spec], self.target_train(spec), self._target_test(spec))
                for spec in self.plan.cfg.data.targets}

    def target_train(self, spec: str) -> ImageSet:
        """A target's train split alone (what a choice on its validation split may read)."""
        return self._target_part(spec, 0)

    def _target_test(self, spec: str) -> ImageSet:
        return self._target_part(spec, 1)

    def _target_part(self, spec: str, part: int) -> ImageSet:
        path = layout.target_paths(self.out, self.plan.target_names[spec])[part]
        freshness.require(path, self.plan.units.target(spec), "ssdd prepare")
        return load_dataset(path)

    def distilled_set(self, method: registry.Method, k: int) -> Path:
        path = layout.distilled_path(self.out, method.name, k)
        freshness.require(path, self.plan.set_unit(method, k), "ssdd distill")
        return path

    def encoder_file(self, method: registry.Method, k: int, arch: str | None) -> torch.nn.Module:
        path = layout.encoder_path(self.out, method.name, k, arch)
        freshness.require(path, self.plan.encoder_unit(method, k, arch), "ssdd pretrain")
        return encoder_from_artifact(path, self.device)[0]

    def encoder(self, method: registry.Method, k: int, arch: str | None) -> torch.nn.Module:
        """The encoder of ``method`` at seed ``k`` (and architecture ``arch``), as its recipe loads it."""
        return self.plan.recipe(method).load(self, k, arch)
