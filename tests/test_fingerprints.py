"""Fingerprints from the inputs actually read (issue 18): roles declared for every key, golden values,
neutral keys that redo nothing, undeclared and stale inputs refused, one stop request per run."""

import atexit
import dataclasses
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest

from ssdd import config
from ssdd import fingerprint as fpr
from ssdd import settings
from ssdd.distill import registry
from ssdd.errors import Stopped, UserError
from ssdd.run import Run, evaluate_files
from ssdd.settings import load_config

GOLDEN = Path(__file__).parent / "golden" / "fingerprints.json"
TINY = {"data.size": 16, "data.heldout": 8, "teacher.epochs": 1, "teacher.batch": 16, "teacher.projector": [16, 16],
        "teacher.model.widths": [8, 8], "model.widths": [4, 8], "distill.m": 6, "distill.batch": 8,
        "distill.krr_st.steps": 4, "distill.krr_st.pool_size": 2, "distill.krr_st.pool_max_age": 3,
        "distill.krr_st.check_models": 1, "distill.krr_st.check_batches": 1, "pretrain.epochs": 2,
        "pretrain.batch": 8, "evaluate.seeds": 1, "evaluate.protocols": ["linear"], "evaluate.linear_fractions": [0.5],
        "evaluate.linear_draws": 1, "evaluate.linear_c_grid": [1.0], "evaluate.validation": 0.0, "precision": "fp32",
        "methods": ["krr_st", "random_subset", "no_pretrain", "full_ssl"]}
SOURCE = Path(tempfile.mkdtemp(prefix="ssdd-fingerprints-")) / "src.npz"
atexit.register(shutil.rmtree, SOURCE.parent, ignore_errors=True)
rng = np.random.default_rng(0)
np.savez(SOURCE, x=rng.integers(0, 256, (48, 16, 16, 3), dtype=np.uint8), y=np.arange(48) % 4)


def tiny(**over) -> config.Config:
    """A tiny run on 48 random 16-px images (source and target alike)."""
    values = {"data.source": f"npz:{SOURCE}", "data.targets": [f"npz:{SOURCE}"], **TINY, **over}
    return load_config("demo", {k: json.dumps(v) if not isinstance(v, str) else v for k, v in values.items()})


def config_classes(cls=settings.Config, seen=None):
    seen = [] if seen is None else seen
    if cls not in seen:
        seen.append(cls)
        instance = cls()
        for f in dataclasses.fields(cls):
            value = getattr(instance, f.name)
            if dataclasses.is_dataclass(value):
                config_classes(type(value), seen)
    return seen


def test_every_config_key_declares_its_role_and_neutral_value():
    for cls in config_classes():
        table = config.roles_of(cls)  # raises when a field has no role, or a role names no field
        defaults = cls()
        for name, role in table.items():
            assert role.affects in ("result", "numerics", "meta"), f"{cls.__name__}.{name}"
            if role.neutral is not config.NO_NEUTRAL:
                assert type(role.neutral) is type(getattr(defaults, name)), f"{cls.__name__}.{name}: neutral's type"


def test_a_key_without_a_role_is_refused():
    @dataclasses.dataclass
    class Section:
        a: int = 1
        b: int = 2
        ROLES = config.roles("a")

    with pytest.raises(TypeError, match=r"missing: \['b'\]"):
        config.roles_of(Section)


def unit_fingerprints(preset: str) -> dict[str, dict[str, str | None]]:
    cfg = load_config(preset, {"precision": "fp32"})
    run = Run(cfg, "/nonexistent/golden", device="cpu", progress=False)
    out = {}
    for stage in ("prepare", "teacher", "distill", "pretrain", "evaluate"):
        for unit in run.plan.stage_units(stage):
            out[unit.label] = {"fingerprint": unit.fp, "format1": unit.legacy}
    for stage in ("prepare", "teacher", "distill", "pretrain", "evaluate", "report"):
        out[f"stage {stage}"] = {"fingerprint": None, "format1": run.plan.units.legacy.stage(stage)}
    return out


@pytest.mark.parametrize("preset", ["demo", "tinyimagenet"])
def test_golden_fingerprints(preset):
    """Every unit fingerprint of a preset, pinned. A change here redoes users' work: update the file
    (SSDD_UPDATE_GOLDEN=1) only on purpose, in a commit that says why. ``format1`` pins the frozen rule
    that accepts folders made before inputs were recorded."""
    got = unit_fingerprints(preset)
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if os.environ.get("SSDD_UPDATE_GOLDEN"):
        golden[preset] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    assert got == golden[preset]


def test_neutral_leaves_and_rounding_keys_are_not_hashed():
    base = tiny()
    run = Run(base, "/nonexistent/a", device="cpu", progress=False)
    krr = registry.get("krr_st")
    same = [tiny(**{"distill.krr_st.fold_bn": False}), tiny(**{"distill.krr_st.check_models": 3}),
            tiny(**{"checkpoint_every": 7}), tiny(**{"evaluate.seeds": 2})]
    for cfg in same:
        other = Run(cfg, "/nonexistent/a", device="cpu", progress=False)
        assert other.plan.set_unit(krr, 0).fp == run.plan.set_unit(krr, 0).fp
    changed = Run(tiny(**{"distill.krr_st.chunk": 5}), "/nonexistent/a", device="cpu", progress=False)
    assert changed.plan.set_unit(krr, 0).fp != run.plan.set_unit(krr, 0).fp  # chunk changes BatchNorm statistics
    assert "distill.krr_st.chunk 2000 -> 5" in fpr.explain(run.plan.set_unit(krr, 0).inputs, changed.plan.set_unit(krr, 0).inputs)


def test_a_student_option_under_model_leaves_the_teacher_alone():
    """Case 2: the teacher reads ``teacher.model``, never ``model``."""
    a = Run(tiny(), "/nonexistent/a", device="cpu", progress=False)
    b = Run(tiny(**{"model.norm": "instance", "model.widths": [8, 16]}), "/nonexistent/a", device="cpu", progress=False)
    assert a.plan.units.teacher().fp == b.plan.units.teacher().fp
    assert a.plan.set_unit(registry.get("krr_st"), 0).fp != b.plan.set_unit(registry.get("krr_st"), 0).fp


def test_naive_bilevel_declares_the_ridge_it_reads():
    """Case 3: naive bilevel's objective uses distill.krr_st.ridge, so a changed ridge redoes its sets; and
    reading an undeclared key inside a method is an error, not a silent stale reuse."""
    nb = registry.get("naive_bilevel")
    a = Run(tiny(methods=["naive_bilevel"]), "/nonexistent/a", device="cpu", progress=False)
    b = Run(tiny(methods=["naive_bilevel"], **{"distill.krr_st.ridge": 1e-3}), "/nonexistent/a", device="cpu",
            progress=False)
    assert a.plan.set_unit(nb, 0).fp != b.plan.set_unit(nb, 0).fp
    view = registry.declared(tiny().distill, "some_method", ("distill.kip",))
    assert view.kip.steps and view.m
    with pytest.raises(AttributeError, match="distill.krr_st is not among the declared inputs of some_method"):
        view.krr_st.ridge


def with_new_model_key(cfg: config.Config, value: int) -> config.Config:
    """The config as an upgraded ssdd would make it: ModelConfig has gained ``new_option`` (neutral 1)."""
    cls = dataclasses.make_dataclass("ModelConfig", [("new_option", int, dataclasses.field(default=1))],
                                     bases=(config.ModelConfig,))
    cls.ROLES = {**config.ModelConfig.ROLES, "new_option": config.neutral(1)}
    cfg = dataclasses.replace(cfg)
    cfg.model = cls(**dataclasses.asdict(cfg.model), new_option=value)
    cfg.teacher = dataclasses.replace(cfg.teacher, model=cls(**dataclasses.asdict(cfg.teacher.model)))
    return cfg


def artifact_times(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".ssdd.lock"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fingerprints") / "run"
    Run(tiny(), out, device="cpu", progress=False).run(until="evaluate")
    return out


def test_an_upgrade_that_adds_a_neutral_key_redoes_nothing(tiny_run):
    before = artifact_times(tiny_run)
    Run(with_new_model_key(tiny(), 1), tiny_run, device="cpu", progress=False).run(until="evaluate")
    assert artifact_times(tiny_run) == before
    moved = Run(with_new_model_key(tiny(), 2), tiny_run, device="cpu", progress=False)
    plain = Run(tiny(), tiny_run, device="cpu", progress=False)
    assert moved.plan.set_unit(registry.get("krr_st"), 0).fp != plain.plan.set_unit(registry.get("krr_st"), 0).fp


def test_a_stage_run_alone_refuses_a_stale_teacher(tiny_run, tmp_path):
    """Case 4: after a teacher change, `ssdd distill` alone stops in one line instead of stamping the old
    teacher's sets with the new fingerprint; `ssdd run` then remakes the teacher and the sets."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    changed = tiny(**{"teacher.lr": 1e-3})
    with pytest.raises(UserError, match=r"teacher.safetensors: made for another config \(teacher.lr 0.002 -> 0.001\); "
                                        r"run `ssdd teacher`") as err:
        Run(changed, out, device="cpu", progress=False).run(only="distill")
    assert "\n" not in str(err.value)
    before = artifact_times(out)
    Run(changed, out, device="cpu", progress=False).run(until="distill")
    after = artifact_times(out)
    assert after["teacher.safetensors"] != before["teacher.safetensors"]
    assert after["distilled/krr_st.safetensors"] != before["distilled/krr_st.safetensors"]
    with pytest.raises(UserError, match=r"encoders/krr_st.safetensors: made for another config .*run `ssdd pretrain`"):
        Run(changed, out, device="cpu", progress=False).run(only="evaluate")


def test_standalone_evaluate_says_it_cannot_run_kd(tmp_path):
    """Case 6a: `ssdd evaluate --encoder ... --protocols kd` used to write no kd rows and say nothing."""
    with pytest.raises(UserError, match="--protocols kd: needs each encoder's distilled set"):
        evaluate_files(tiny(**{"evaluate.protocols": ["linear", "kd"]}), ["none"], [f"npz:{SOURCE}"], tmp_path / "e",
                       device="cpu", progress=False)


def test_a_stop_during_a_units_last_step_stops_the_run(tiny_run, tmp_path, monkeypatch):
    """Case 6b: a SIGTERM that lands during a unit's last step used to be taken by a second, inner stop
    handler and lost: the run went on with the next unit. Now the run stops before the next unit."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    real = registry.get("random_subset")

    def signal_at_last_step(ctx):
        result = real.run(ctx)
        os.kill(os.getpid(), signal.SIGTERM)  # lands after the unit's last stop check: it finishes and is saved
        return result

    monkeypatch.setitem(registry._METHODS, "stopper", dataclasses.replace(real, name="stopper", run=signal_at_last_step))
    cfg = tiny(methods=["stopper", "random_subset"], **{"evaluate.seeds": 2})
    with pytest.raises(Stopped):
        Run(cfg, out, device="cpu", progress=False).run(until="distill")
    assert (out / "distilled" / "stopper.safetensors").is_file()  # the unit that was running finished
    assert not (out / "distilled" / "stopper.seed1.safetensors").exists()  # and nothing after it started
