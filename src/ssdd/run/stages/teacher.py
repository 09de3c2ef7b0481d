"""Stage ``teacher``: Barlow Twins on the source (checkpointed), or a brought teacher checked and stored."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

import ssdd.run.freshness as freshness
import ssdd.run.units as units
from ssdd import artifacts, live_log
from ssdd.data import ImageSet, load_source
from ssdd.models import model_spec
from ssdd.run.stages.base import Stage
from ssdd.run.state import RunState
from ssdd.teacher import as_teacher, load_teacher_module, train_barlow_twins

log = logging.getLogger("ssdd")


class Teacher(Stage):
    name = "teacher"

    def outputs(self, run: RunState) -> list[Path]:
        return [run.plan.teacher_file()]

    def run(self, run: RunState) -> None:
        cfg, unit, path = run.cfg, run.plan.units.teacher(), run.plan.teacher_file()
        data = run.inputs.source("train")
        norm = run.inputs.norm(data)
        if cfg.teacher.path:  # bring your own: checked, then stored in our format where possible
            spec = model_spec(cfg.teacher.model, data.shape[0], data.shape[1], out_dim=0)
            module, module_spec = load_teacher_module(cfg.teacher.path, spec)
            as_teacher(module, data.shape[0], data.shape[1], f"--teacher {cfg.teacher.path}")
            if module_spec is not None:
                artifacts.save_encoder(path, module, module_spec,
                                       {"method": "external", "path": str(cfg.teacher.path), **unit.record()})
            else:
                artifacts.write_bytes(path, Path(cfg.teacher.path).read_bytes())
                freshness.write_inputs_beside(path, unit)
            return
        if cfg.teacher.extra_sources:
            extra = [load_source(spec, cfg.data.size, "train").images for spec in cfg.teacher.extra_sources]
            data = ImageSet(torch.cat([data.images, *extra]), None, [], "teacher_images")
            log.info("teacher  trains on %d unlabeled images (source + teacher.extra_sources)", len(data))
        with live_log.scope("teacher"):
            ckpt, result = units.resumable(run, "teacher", unit, lambda hooks: train_barlow_twins(
                data, norm, cfg.teacher, cfg.seed, run.device, run.progress, hooks.resume, hooks.checkpoint,
                hooks.checkpoint_due, hooks.should_stop, data_parallel=True))
        artifacts.save_encoder(path, result.encoder, result.spec,
                               {"method": "barlow_twins", "source": cfg.data.source, "seed": cfg.seed,
                                "extra_sources": cfg.teacher.extra_sources, "images_seen": len(data),
                                "loss_curve": result.losses, **unit.record()})
        ckpt.clear()
