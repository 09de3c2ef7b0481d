"""Stage ``pretrain``: an encoder per method, seed and architecture, by the method's recipe
(:mod:`ssdd.run.encoders`), spread over the ranks in rounds."""

from __future__ import annotations

from pathlib import Path

import ssdd.run.units as units
from ssdd import artifacts, distributed, layout, live_log
from ssdd.run.stages.base import Stage
from ssdd.run.state import RunState


def encoder_files(run: RunState) -> list[tuple]:
    """(method, seed, arch, path) of every encoder file the stage writes."""
    plan = run.plan
    return [(m, k, a, layout.encoder_path(run.out, m.name, k, a)) for m in plan.methods for a in plan.archs(m)
            for k in plan.encoder_seeds(m) if plan.recipe(m).writes_file(plan)]


class Pretrain(Stage):
    name = "pretrain"

    def outputs(self, run: RunState) -> list[Path]:
        return [path for *_, path in encoder_files(run)] + [layout.pretrain_log_path(run.out)]

    def run(self, run: RunState) -> None:
        plan, todo = run.plan, []
        for method, k, arch, path in encoder_files(run):
            unit = plan.encoder_unit(method, k, arch)
            if not units.fresh(path, unit):
                todo.append((method, k, arch, path, unit))

        def make(u: tuple) -> tuple:
            with live_log.scope(f"pretrain/{layout.pretrain_log_key(u[0].name, u[1], u[2])}"):
                return plan.recipe(u[0]).make(run, u[1], u[2])

        units.in_rounds(run, "pretrain", todo, make,
                        lambda u, made: artifacts.save_encoder(u[3], made[0], made[1], {**made[2], **u[4].record()}))
        if distributed.is_main():
            curves = {layout.pretrain_log_key(m.name, k, a): artifacts.read_meta(path).get("loss_curve")
                      for m, k, a, path in encoder_files(run)}
            artifacts.write_json(layout.pretrain_log_path(run.out),
                                 {"epoch_loss": {key: c for key, c in curves.items() if c}})
