"""Stage ``prepare``: the source split into train and held-out (labels kept apart), and each target."""

from __future__ import annotations

from pathlib import Path

import torch

from ssdd import artifacts, layout
from ssdd.data import ImageSet, load_source, save_dataset
from ssdd.data.sources import load_target
from ssdd.errors import UserError
from ssdd.run.stages.base import Stage
from ssdd.run.state import RunState


class Prepare(Stage):
    name, main_only, atomic = "prepare", True, True

    def outputs(self, run: RunState) -> list[Path]:
        return [layout.source_path(run.out, "train"), layout.source_path(run.out, "heldout")] + [
            p for t in run.cfg.data.targets for p in layout.target_paths(run.out, run.plan.target_names[t])]

    def run(self, run: RunState) -> None:
        data, units = run.cfg.data, run.plan.units
        source = load_source(data.source, data.size, "train", data.source_max_per_class or None, run.progress)
        if data.heldout >= len(source):
            raise UserError(f"config: data.heldout={data.heldout} leaves no source images ({len(source)} in all)")
        order = torch.randperm(len(source), generator=torch.Generator().manual_seed(run.cfg.seed))
        unlabeled = ImageSet(source.images, None, [], source.name)  # the source's labels are never read
        if run.plan.set_methods() and run.cfg.distill.m > len(source) - data.heldout:
            raise UserError(f"config: distill.m={run.cfg.distill.m} is larger than the source "
                            f"({len(source) - data.heldout} images after data.heldout={data.heldout})")
        record = units.source().record()
        save_dataset(layout.source_path(run.out, "train"), unlabeled.subset(order[data.heldout:]), record)
        save_dataset(layout.source_path(run.out, "heldout"), unlabeled.subset(order[:data.heldout]), record)
        for target in data.targets:
            train, test = load_target(target, data.size, run.cfg.evaluate.test_split, data.target_max_per_class or None,
                                      run.progress)
            train_path, test_path = layout.target_paths(run.out, run.plan.target_names[target])
            save_dataset(train_path, train, units.target(target).record())
            save_dataset(test_path, test, units.target(target).record())
        labels_path = layout.source_labels_path(run.out)
        if source.labels is not None:  # kept apart: only labelled baselines (dsa, dm, ...) read them
            artifacts.save_tensors(labels_path, {"labels": source.labels[order[data.heldout:]].long()},
                                   {"class_names": list(source.class_names), "num_classes": source.num_classes})
        elif labels_path.is_file():
            labels_path.unlink()
