"""Stage ``evaluate``: every (encoder, target) unit under the configured protocols, spread over the ranks,
fine-tunes checkpointed; then the ``kd`` protocol as one unit; then ``results.json`` / ``.csv``."""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

import torch

import ssdd.run.units as units
from ssdd import artifacts, distilled_set, layout, live_log
from ssdd.checkpoint import Checkpointer, Hooks
from ssdd.errors import UserError
from ssdd.evaluate import Target, evaluate_encoder
from ssdd.evaluate.kd import kd_rows
from ssdd.models import Encoder
from ssdd.run.plan import EvalUnit
from ssdd.run.stages.base import Stage
from ssdd.run.state import RunState


def write_results(out: Path, rows: list[dict]) -> None:
    json_path, csv_path = layout.results_paths(out)
    artifacts.write_json(json_path, rows)
    buf = io.StringIO()
    fields = list(dict.fromkeys(key for row in rows for key in row)) or ["method"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    artifacts.write_bytes(csv_path, buf.getvalue().encode())


class Evaluate(Stage):
    name = "evaluate"

    def outputs(self, run: RunState) -> list[Path]:
        return list(layout.results_paths(run.out))

    def run(self, run: RunState) -> None:
        cfg = run.cfg
        targets = run.inputs.targets()
        todo, done = [], {}
        for unit in run.plan.evaluation_units():
            unit = dataclasses.replace(unit, target=targets[unit.target])
            if units.fresh(unit.path, unit.unit):
                done[unit.order] = artifacts.read_json(unit.path)["rows"]
            else:
                todo.append(unit)

        def keep(unit: EvalUnit, rows: list[dict]) -> None:
            artifacts.write_json(unit.path, {**unit.unit.record(), "rows": rows})
            for fraction in cfg.evaluate.finetune_fractions:
                finetune_checkpointer(run, unit, fraction).clear()
            done[unit.order] = rows

        units.in_rounds(run, "evaluate", todo, lambda unit: evaluate_unit(run, unit), keep)
        rows = [row for order in sorted(done) for row in done[order]]
        if "kd" in cfg.evaluate.protocols:
            rows += kd(run, list(targets.values()))
        write_results(run.out, rows)


def evaluate_unit(run: RunState, unit: EvalUnit) -> list[dict]:
    """One encoder on one target, every protocol; fine-tunes checkpoint mid-run (into this rank's own
    files under torchrun: units run on different ranks at once) and resume."""
    eval_cfg = run.cfg.evaluate if unit.arch is None else dataclasses.replace(run.cfg.evaluate, protocols=["finetune"])
    encoder = run.inputs.encoder(unit.method, unit.enc_k, unit.arch)

    def hooks(fraction: float) -> Hooks:
        ckpt = finetune_checkpointer(run, unit, fraction)
        return Hooks(ckpt.load(), ckpt.save, ckpt.due, run.stop, agree=False)

    assert isinstance(unit.target, Target)
    name = f"{unit.method.name}{'@' + unit.arch if unit.arch else ''}/{unit.target.name}/seed{unit.k}"
    with artifacts.own_writes(), live_log.scope(f"finetune/{name}"):
        rows = evaluate_encoder(unit.method.name, run.cfg.seed + unit.k, encoder, unit.target, eval_cfg,
                                str(run.device), run.progress, finetune_hooks=hooks)
    recipe = encoder_recipe(run, unit)
    return [{**row, "group": unit.group, **({"recipe": recipe} if recipe else {})} for row in rows]


def encoder_recipe(run: RunState, unit: EvalUnit) -> str | None:
    """The pre-training recipe the evaluated encoder was made by, when it records one (``pretrain.recipes``)."""
    path = layout.encoder_path(run.out, unit.method.name, unit.enc_k, unit.arch)
    return artifacts.read_meta(path).get("recipe") if path.suffix == ".safetensors" and path.is_file() else None


def finetune_checkpointer(run: RunState, unit: EvalUnit, fraction: float) -> Checkpointer:
    name = f"finetune-{unit.group}-{unit.path.stem}-{fraction:g}"
    return units.checkpointer(run, name, run.plan.units.finetune(unit.unit, fraction))


def kd(run: RunState, targets: list[Target]) -> list[dict]:
    """The ``kd`` protocol (:func:`ssdd.evaluate.kd.kd_rows`) as one unit: each set method's students learn
    from its own distilled images."""
    path, unit = layout.kd_path(run.out), run.plan.kd_unit()
    if units.fresh(path, unit):
        return artifacts.read_json(path)["rows"]

    def students(k: int, target: Target) -> list[tuple[str, torch.Tensor, Encoder]]:
        out = []
        for method in run.plan.set_methods():
            found = distilled_set.load(run.inputs.distilled_set(method, k))
            if found.images.shape[1:] != target.train.images.shape[1:]:
                raise UserError(f"target {target.name}: kd needs distilled images shaped like the target's "
                                f"{list(target.train.shape)}, got {list(found.images.shape[1:])}")
            # a normalised set is clipped to [0, 1] on its way back to pixels, a reference-space one is not
            pixels = found.pixels() if found.image_space == "normalized" else found.to_unit()
            out.append((method.name, pixels, run.inputs.encoder(method, k, None)))
        return out

    rows = kd_rows(targets, students, run.cfg.model, run.cfg.evaluate, run.cfg.seed, run.plan.seeds(),
                   str(run.device), run.progress)
    artifacts.write_json(path, {**unit.record(), "rows": rows})
    return rows
