"""`ssdd run`: the stages in order for the configured methods, in one output folder, each skipped when
its artifacts exist for the same inputs.

Two levels of reuse. A finished stage leaves ``config.<stage>.json`` with the fingerprints of its units;
inside a stage every artifact (a distilled set per method and seed, an encoder, one evaluation unit)
carries the inputs it was made from (:mod:`ssdd.run.freshness`), so adding a method, a seed or a target
redoes only what is new, and a finished unit is never redone.

Seeds: seed k (k < evaluate.seeds) is one distillation per method from the paired random draw of
seed ``seed + k``, its random_subset (that same draw), one pre-training and the label draws of
seed k. An interval over seeds therefore covers distillation-to-distillation variance.

The core knows *that* there are stages; what each does lives in ``ssdd.run.stages``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch

from ssdd import artifacts, determinism, distributed, folder_lock, layout, live_log, precision
from ssdd.config import Config, to_dict
from ssdd.data import load_dataset
from ssdd.distill import registry
from ssdd.errors import UserError
from ssdd.interrupt import StopRequest
from ssdd.models import names as model_names
from ssdd.run.inputs import Inputs
from ssdd.run.plan import Plan
from ssdd.run.setup import resolve_device, run_precision
from ssdd.run.stages import STAGES, Stage

log = logging.getLogger("ssdd")
STAGE_NAMES = tuple(stage.name for stage in STAGES)


class Run:
    """One pipeline run in one output folder."""

    def __init__(self, cfg: Config, out: str | Path, device: str = "auto", progress: bool = True):
        device = distributed.setup(device)  # under torchrun: join the group, this rank's GPU
        self.cfg, self.out, self.device = cfg, Path(out), resolve_device(device)
        determinism.configure(cfg.deterministic, self.device)
        self.progress = progress and distributed.is_main()
        self.precision = run_precision(cfg, self.device)
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out}: exists and is a file, expected a folder")
        if cfg.teacher.path and not Path(cfg.teacher.path).is_file():
            raise UserError(f"--teacher {cfg.teacher.path}: file not found")
        live_log.require(cfg.log)  # --log tensorboard without its package: one line, before any work
        unknown = [a for a in cfg.pretrain.archs if a not in model_names()]
        if unknown:
            raise UserError(f"config: pretrain.archs: unknown architecture(s) {unknown} "
                            f"(available: {', '.join(model_names())})")
        methods = [registry.get(name) for name in cfg.methods]  # unknown names fail here, before any work
        if len(set(cfg.methods)) != len(cfg.methods):
            raise UserError(f"config: methods lists a method twice: {cfg.methods}")
        self.plan = Plan(cfg, self.precision, self.out, methods)
        self.inputs = Inputs(self.plan, self.out, self.device)
        self.stop: Callable[[], bool] = lambda: False

    def run(self, until: str | None = None, only: str | None = None) -> None:
        if until is not None and until not in STAGE_NAMES:
            raise UserError(f"--until: unknown stage '{until}' (stages: {', '.join(STAGE_NAMES)})")
        last = STAGE_NAMES.index(until) + 1 if until else len(STAGES)
        stages = [s for s in STAGES if s.name == only] if only else list(STAGES[:last])
        with folder_lock.hold(self.out), live_log.opened(self.cfg.log, layout.live_log_dir(self.out),
                                                          self.cfg.log_images_every):
            self._run_stages(stages)

    def _run_stages(self, stages: list[Stage]) -> None:
        if distributed.is_main():
            for stale in self.out.rglob(".*.tmp") if self.out.is_dir() else []:
                stale.unlink(missing_ok=True)  # a temp file left by a killed write is never an artifact
        if distributed.active():
            log.info("distributed: %d ranks (%s), this is rank 0 on %s", distributed.world(),
                     torch.distributed.get_backend(), self.device)
        log.info("precision %s (config: %s) on %s", self.precision, self.cfg.precision, precision.describe(self.device))
        for stage in stages:
            if stage.name != "prepare":
                self.preflight()
            distributed.barrier()  # what rank 0 wrote so far is there for every rank
            if distributed.broadcast(self.is_done(stage)):
                log.info("%-8s skipped: artifacts exist for this config", stage.name)
                continue
            start = time.perf_counter()
            existed = {p for p in stage.outputs(self) if p.exists()}
            try:
                with StopRequest() as stop, precision.use(self.precision):
                    self.stop = stop  # the one stop request of this stage: every loop in it polls this
                    if not stage.main_only or distributed.is_main():
                        stage.run(self)
            except BaseException:
                if stage.atomic and distributed.is_main():  # never half prepared; later stages keep their units
                    for path in stage.outputs(self):
                        if path not in existed:
                            try:
                                path.unlink(missing_ok=True)
                            except OSError:
                                pass
                raise
            self.mark_done(stage)
            log.info("%-8s done in %.1f s", stage.name, time.perf_counter() - start)

    def is_done(self, stage: Stage) -> bool:
        sidecar = layout.stage_config_path(self.out, stage.name)
        if not sidecar.is_file() or not all(p.exists() for p in stage.outputs(self)):
            return False
        try:
            done = artifacts.read_json(sidecar)
        except UserError:
            return False
        if "inputs" not in done:  # written before inputs were recorded: the old rule decides
            return done.get("fingerprint") == self.plan.units.legacy.stage(stage.name)
        return done.get("fingerprint") == self.plan.units.stage(stage.name, self.plan.stage_units(stage.name))

    def mark_done(self, stage: Stage) -> None:
        units = self.plan.stage_units(stage.name)
        artifacts.write_json(layout.stage_config_path(self.out, stage.name),
                             {"stage": stage.name, "fingerprint": self.plan.units.stage(stage.name, units),
                              "inputs": {unit.label: unit.fp for unit in units}, "config": to_dict(self.cfg)})

    def preflight(self) -> None:
        """What can be checked before hours of work: the budget m against the prepared source."""
        path = layout.source_path(self.out, "train")
        if path.is_file():
            n = int(artifacts.read_meta(path).get("count", 0)) or len(load_dataset(path))
            if self.cfg.distill.m > n and self.plan.set_methods():
                raise UserError(f"config: distill.m={self.cfg.distill.m} is larger than the source ({n} images)")


def run_pipeline(cfg: Config, out: str | Path, until: str | None = None, only: str | None = None,
                 device: str = "auto", progress: bool = True) -> Path:
    Run(cfg, out, device, progress).run(until=until, only=only)
    return Path(out)
