"""Stage ``distill``: every set method at every seed, each set its own checkpointed unit; prep stages
(experts, teacher views) made once and shared."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

import ssdd.run.freshness as freshness
import ssdd.run.units as units
from ssdd import artifacts, distilled_set, layout, live_log
from ssdd.data import ImageSet
from ssdd.distill import registry
from ssdd.distill.registry import DistillContext, DistilledSet, declared, random_index
from ssdd.errors import UserError
from ssdd.models import model_spec
from ssdd.run.freshness import Unit
from ssdd.run.stages.base import Stage
from ssdd.run.state import RunState
from ssdd.views import approx as view_approx

log = logging.getLogger("ssdd")


def distill_context(run: RunState, source: ImageSet, heldout: ImageSet | None, cache: dict) -> DistillContext:
    """The context of the first seed; :func:`for_seed` derives the others."""
    c, h, _ = source.shape
    teacher, dim = run.inputs.teacher(c, h)
    spec = model_spec(run.cfg.model, c, h, out_dim=dim)
    return DistillContext(source, heldout, teacher.eval(), run.inputs.norm(source), spec, run.cfg.distill,
                          run.cfg.seed, random_index(len(source), run.cfg.distill.m, run.cfg.seed), run.device,
                          run.progress, cache=cache, labels=run.inputs.labels())


def for_seed(run: RunState, ctx: DistillContext, k: int) -> DistillContext:
    seed = run.cfg.seed + k
    return dataclasses.replace(ctx, seed=seed, init_index=random_index(len(ctx.source), run.cfg.distill.m, seed),
                               heldout=ctx.heldout if k == 0 else None)  # the held-out check: first seed only


class Distill(Stage):
    name = "distill"

    def outputs(self, run: RunState) -> list[Path]:
        return [layout.distilled_path(run.out, m.name, k) for m in run.plan.set_methods() for k in run.plan.seeds()]

    def run(self, run: RunState) -> None:
        plan = run.plan
        base = distill_context(run, run.inputs.source("train"), run.inputs.source("heldout"), cache={})
        for method in plan.set_methods():  # what can be refused (MKDT's memory) is, before any method's work
            stale = any(not freshness.status(layout.distilled_path(run.out, method.name, k),
                                             plan.set_unit(method, k))[0] for k in plan.seeds())
            if method.preflight is not None and stale:
                method.preflight(base)
        for method in plan.set_methods():
            prep = {name: self.prep(run, name, base) for name in plan.active_preps(method)}
            for k in plan.seeds():
                path, unit = layout.distilled_path(run.out, method.name, k), plan.set_unit(method, k)
                if units.fresh(path, unit):
                    log.info("distill  %s seed %d: exists", method.name, k)
                    continue
                units.check_stop(run, "distill", k)
                ctx = dataclasses.replace(for_seed(run, base, k), prep=prep,
                                          cfg=declared(run.cfg.distill, method.name, method.needs))
                start = time.perf_counter()
                with live_log.scope(f"distill/{method.name}/seed{k}"):
                    ckpt, result = units.resumable(run, f"distill-{method.name}{layout.seed_suffix(k)}", unit,
                                                   lambda hooks: method.run(dataclasses.replace(ctx, hooks=hooks)))
                save_set(run, path, method.name, k, unit, result, ctx)
                units.record_time(run.out, layout.distill_timing_key(method.name, k), time.perf_counter() - start)
                ckpt.clear()

    @staticmethod
    def prep(run: RunState, name: str, base: DistillContext) -> dict[str, torch.Tensor]:
        """A preparatory stage's artifact, made once and reused by every method and seed that needs it."""
        path, unit, prep = layout.prep_path(run.out, name), run.plan.prep_unit(name), registry.get_prep(name)
        if units.fresh(path, unit):
            return artifacts.load_tensors(path)[0]
        start = time.perf_counter()
        ctx = dataclasses.replace(base, cfg=declared(run.cfg.distill, f"prep {name}", prep.needs))
        ckpt, tensors = units.resumable(run, f"prep-{name}", unit,
                                        lambda hooks: prep.run(dataclasses.replace(ctx, hooks=hooks)))
        artifacts.save_tensors(path, tensors, {"kind": "prep", "name": name, **unit.record()})
        units.record_time(run.out, layout.prep_timing_key(name), time.perf_counter() - start)
        ckpt.clear()
        return tensors


def save_set(run: RunState, path: Path, name: str, k: int, unit: Unit, result: DistilledSet, ctx: DistillContext) -> None:
    targets = result.targets if result.targets is not None else torch.zeros(len(result.images), 0)
    if not (torch.isfinite(result.images).all() and torch.isfinite(targets).all()):
        raise UserError(f"distill: {name} (seed {k}) ended with NaN/inf in its set; lower its learning rates "
                        f"in distill.{name} (nothing was written)")
    cfg, norm = run.cfg, ctx.norm
    meta = {"method": name, "seed": ctx.seed, "k": k, **unit.record(), "objective": result.objective,
            "lr": result.lr, "source": cfg.data.source, "teacher": cfg.teacher.path or run.plan.teacher_file().name,
            "image_space": cfg.distill.image_space,
            "mean": norm.mean.flatten().tolist(), "std": norm.std.flatten().tolist(), "model_spec": ctx.spec,
            **result.meta}
    view_targets, view_net = None, None
    if cfg.distill.views != "none" and result.objective == "mse":
        view_targets, view_meta = set_views(ctx, result)
        meta.update(view_meta)
        if cfg.distill.view_store == "approx":
            view_net, meta["view_approx_rmse"] = view_approx.fit(targets, view_targets, cfg.distill.view_approx_hidden,
                                                                 seed=ctx.seed)
            view_targets = None
    distilled_set.save_arrays(path, result.images, targets, meta, view_targets, view_net)


def set_views(ctx: DistillContext, result: DistilledSet) -> tuple[torch.Tensor, dict]:
    """The targets of a set's views 1..K-1 (``distill.views``): what the method learned, else the teacher's
    features of the set's own views (exact for real subsets; for synthetic images, the teacher's reading
    of them). Sets whose targets are not MSE targets (labels, self-supervised) carry no views."""
    if result.view_targets is not None:
        return result.view_targets.detach(), {"views": ctx.cfg.views, "view_targets_from": "learned"}
    return ctx.teacher_view_targets(result.images), {"views": ctx.cfg.views, "view_targets_from": "teacher"}
