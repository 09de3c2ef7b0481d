"""Which artifacts of a run folder are fresh for a config: every unit's inputs, and the checks on what is read.

One :class:`Units` per run computes each unit's canonical inputs (:mod:`ssdd.fingerprint`) in a chain:
a set's inputs hold the teacher's and the source's fingerprints, an encoder's the set's, an evaluation
unit's the encoder's and the target's. The pipeline stores a unit's inputs in its artifact, reuses an
artifact only when its stored fingerprint is the unit's (or, for folders made before inputs were
recorded, when the frozen old rule gives its stored fingerprint: :mod:`ssdd.fingerprint_legacy`), and
:func:`require` refuses, in one line, to read an upstream artifact made for another config.

Knows no file names: paths come from the caller.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssdd import artifacts, layout, pretrain_recipes
from ssdd import fingerprint as fpr
from ssdd.config import Config
from ssdd.distill.registry import COMMON as DISTILL_COMMON  # the keys every set reads
from ssdd.errors import UserError
from ssdd.fingerprint_legacy import Legacy

log = logging.getLogger("ssdd")

SOURCE_KEYS = ("seed", "data.source", "data.source_max_per_class", "data.size", "data.heldout")
TARGET_KEYS = ("data.size", "data.target_max_per_class", "evaluate.test_split")
PRETRAIN_KEYS = ("pretrain.epochs", "pretrain.batch", "pretrain.lr", "pretrain.momentum", "pretrain.weight_decay")
KD_KEYS = ("evaluate.kd_iters", "evaluate.kd_temperature", "evaluate.kd_teacher")
PROTOCOL_KEYS = {  # what an evaluation unit reads, per protocol it runs
    "linear": ("evaluate.linear_fractions", "evaluate.linear_draws", "evaluate.probe_features",
               "evaluate.validation", "evaluate.linear_c_grid"),
    "finetune": ("evaluate.finetune_fractions", "evaluate.finetune_iters", "evaluate.finetune_batch",
                 "evaluate.finetune_lr", "evaluate.finetune_momentum", "evaluate.finetune_weight_decay",
                 "evaluate.finetune_flip", "evaluate.finetune_crop_pad", "evaluate.validation"),
}
LEGACY_STALE = "made by an earlier ssdd, for another config"
INPUTS_SUFFIX = ".inputs.json"  # beside an artifact that cannot hold metadata (a TorchScript teacher)


@dataclass(frozen=True)
class Unit:
    """One unit's inputs, its fingerprint, and how an artifact from before recorded inputs is accepted:
    ``legacy`` (its stored fingerprint under the old rule) or ``legacy_sidecar`` (the old stage sidecar
    and its fingerprint, for the teacher and prepared data, which held no fingerprint themselves)."""

    label: str
    inputs: dict[str, Any]
    legacy: str | None = None
    legacy_sidecar: tuple[Path, str] | None = None

    @functools.cached_property
    def fp(self) -> str:
        return fpr.of(self.inputs)

    def record(self) -> dict[str, Any]:
        """The metadata an artifact of this unit carries."""
        return {"fingerprint": self.fp, "inputs": self.inputs}


class Units:
    """Every unit's inputs for one config and resolved precision, in a chain from the prepared source down."""

    def __init__(self, cfg: Config, precision: str, out: Path):
        self.cfg, self.precision, self.out = cfg, precision, out
        self.legacy = Legacy(cfg, precision)
        # every unit downstream chains to these: each made once per run (a cache of this instance's own)
        self.source, self.target = functools.cache(self.source), functools.cache(self.target)
        self.teacher, self.prep = functools.cache(self.teacher), functools.cache(self.prep)

    def _with_precision(self, upstream: dict[str, Any]) -> dict[str, Any]:
        return {**upstream, "precision": self.precision} if self.precision != "fp32" else upstream

    def _old_sidecar(self, stage: str) -> tuple[Path, str]:
        """The stage sidecar that vouched for its artifacts before they held fingerprints, and its old value."""
        return layout.stage_config_path(self.out, stage), self.legacy.stage(stage)

    def _pick(self, keys: tuple[str, ...], exclude: tuple[str, ...] = ()) -> list[fpr.Leaf]:
        return fpr.select(self.cfg, keys, exclude)

    # ---- prepare, teacher ----------------------------------------------------------------
    def source(self) -> Unit:
        inputs = fpr.inputs("source", fpr.STAGE_CODE["prepare"], self._pick(SOURCE_KEYS))
        return Unit("source", inputs, legacy_sidecar=self._old_sidecar("prepare"))

    def target(self, spec: str) -> Unit:
        inputs = fpr.inputs("target", fpr.STAGE_CODE["prepare"], self._pick(("seed",) + TARGET_KEYS), target=spec)
        return Unit(f"target {spec}", inputs,
                    legacy_sidecar=self._old_sidecar("prepare"))

    def teacher(self) -> Unit:
        upstream = self._with_precision({"source": self.source().fp})
        inputs = fpr.inputs("teacher", fpr.STAGE_CODE["teacher"], self._pick(("teacher",)), upstream)
        return Unit("teacher", inputs, legacy_sidecar=self._old_sidecar("teacher"))

    # ---- distill ---------------------------------------------------------------------------
    def _distill_upstream(self) -> dict[str, Any]:
        return self._with_precision({"source": self.source().fp, "teacher": self.teacher().fp})

    def prep(self, name: str, needs: tuple[str, ...]) -> Unit:
        chosen = self._pick(("model",) + DISTILL_COMMON + needs)
        inputs = fpr.inputs("prep", fpr.STAGE_CODE["prep"], chosen, self._distill_upstream(), prep=name)
        return Unit(f"prep {name}", inputs, self.legacy.prep(name))

    def set(self, method: Any, k: int, preps: dict[str, Unit]) -> Unit:
        """``method``: a registry entry (name, needs, version); ``preps``: its active preps' units."""
        chosen = self._pick(("model",) + DISTILL_COMMON + tuple(method.needs))
        upstream = {**self._distill_upstream(), **{f"prep {name}": unit.fp for name, unit in preps.items()}}
        inputs = fpr.inputs("set", method.version, chosen, upstream, method=method.name, k=k, seed=self.cfg.seed + k)
        return Unit(f"distill {method.name} seed {k}", inputs, self.legacy.method(method.name, k))

    # ---- pretrain, evaluate ---------------------------------------------------------------
    def teacher_encoder(self, name: str) -> Unit:
        """The teacher itself as an encoder (``full_ssl``)."""
        inputs = fpr.inputs("encoder", fpr.STAGE_CODE["pretrain"], (), {"teacher": self.teacher().fp}, method=name)
        return Unit(f"pretrain {name} seed 0", inputs, self.legacy.encoder(name, 0, None))

    def random_encoder(self, name: str, k: int, arch: str | None) -> Unit:
        """A freshly initialised encoder (``no_pretrain``)."""
        inputs = fpr.inputs("encoder", fpr.STAGE_CODE["pretrain"], self._pick(("seed", "model")),
                            self._with_precision({}), method=name, k=k, arch=arch)
        return Unit(f"pretrain {name}{'@' + arch if arch else ''} seed {k}", inputs, self.legacy.encoder(name, k, arch))

    def set_encoder(self, name: str, k: int, arch: str | None, set_unit: Unit) -> Unit:
        """An encoder pre-trained on the distilled set ``set_unit``: with several recipes, the one its linear
        probe chose on the validation split of one target, whose keys and data are then inputs too."""
        keys, upstream = PRETRAIN_KEYS + ("pretrain.recipes",), {"set": set_unit.fp}
        if pretrain_recipes.choosing(self.cfg):
            keys += ("pretrain.choose_on",) + PROTOCOL_KEYS["linear"]
            upstream["choice target"] = self.target(pretrain_recipes.choice_target(self.cfg)).fp
        inputs = fpr.inputs("encoder", fpr.STAGE_CODE["pretrain"], self._pick(keys),
                            self._with_precision(upstream), method=name, k=k, arch=arch)
        return Unit(f"pretrain {name}{'@' + arch if arch else ''} seed {k}", inputs, self.legacy.encoder(name, k, arch))

    def evaluation(self, method_name: str, k: int, enc_k: int, arch: str | None, target: str,
                   encoder: Unit, protocols: list[str]) -> Unit:
        """One encoder on one target under ``protocols`` (without kd, which is a unit of its own)."""
        keys = ("evaluate.protocols",) + tuple(key for p in protocols for key in PROTOCOL_KEYS.get(p, ()))
        chosen = [leaf for leaf in self._pick(keys) if leaf.path != "evaluate.protocols"]
        upstream = self._with_precision({"encoder": encoder.fp, "target": self.target(target).fp})
        inputs = fpr.inputs("evaluation", fpr.STAGE_CODE["evaluate"], chosen, upstream, method=method_name, k=k,
                            seed=self.cfg.seed + k, arch=arch, protocols=[p for p in protocols if p != "kd"])
        return Unit(f"evaluate {method_name}{'@' + arch if arch else ''} seed {k} on {target}", inputs,
                    self.legacy.evaluation(method_name, enc_k, arch, target, k))

    def kd(self, students: list[tuple[str, int, Unit, Unit]]) -> Unit:
        """``students``: (method, k, set unit, encoder unit) of every set method and seed."""
        chosen = self._pick(KD_KEYS + PROTOCOL_KEYS["finetune"] + ("model", "evaluate.seeds"))
        upstream = self._with_precision({
            "targets": {spec: self.target(spec).fp for spec in self.cfg.data.targets},
            "students": [[name, k, s.fp, e.fp] for name, k, s, e in students]})
        inputs = fpr.inputs("kd", fpr.STAGE_CODE["kd"], chosen, upstream)
        return Unit("evaluate kd", inputs, self.legacy.kd([(name, k) for name, k, _, _ in students]))

    @staticmethod
    def finetune(unit: Unit, fraction: float) -> Unit:
        inputs = fpr.inputs("finetune", fpr.STAGE_CODE["finetune"], (), {"evaluation": unit.fp}, fraction=fraction)
        return Unit(f"{unit.label}, fine-tune {fraction:g}", inputs,
                    Legacy.finetune(unit.legacy, fraction) if unit.legacy else None)

    def stage(self, stage: str, units: list[Unit]) -> str:
        """A stage is done when every one of its units is: the hash of their fingerprints."""
        return fpr.of({"kind": "stage", "stage": stage, "units": sorted(u.fp for u in units)})


# ---- reading what an artifact recorded --------------------------------------------------------

def recorded(path: Path) -> dict[str, Any] | None:
    """An artifact's metadata (``fingerprint``, ``inputs``, ...), or None when it is missing or unreadable."""
    side = path.with_name(path.name + INPUTS_SUFFIX)
    try:
        if path.suffix == ".json":
            meta = artifacts.read_json(path)
        elif path.suffix == ".safetensors":
            meta = artifacts.read_meta(path)
        else:
            meta = artifacts.read_json(side) if side.is_file() else {}
    except UserError:
        return None
    return meta if path.is_file() and isinstance(meta, dict) else None


def write_inputs_beside(path: Path, unit: Unit) -> None:
    """For an artifact without metadata of its own (a TorchScript teacher)."""
    artifacts.write_json(path.with_name(path.name + INPUTS_SUFFIX), unit.record())


def _as_text(value: Any) -> str | None:
    """A stored fingerprint as text. Artifacts written before strings that read as JSON were stored
    JSON-encoded (:func:`ssdd.artifacts.save_tensors`) give one of digits only back as an int, and one like
    ``12e4...`` as a float, which cannot be read back: such an artifact is redone."""
    if isinstance(value, bool) or value is None:
        return None
    return str(value) if isinstance(value, (str, int)) else None


def status(path: Path, unit: Unit) -> tuple[bool, str]:
    """(fresh, why not): ``path`` exists and was made for ``unit``'s inputs."""
    meta = recorded(path)
    if meta is None:
        return False, "missing"
    if "inputs" in meta:  # the hash of what it recorded (a safetensors header may give a fingerprint back as a number)
        if isinstance(meta["inputs"], dict) and fpr.of(meta["inputs"]) == unit.fp:
            return True, ""
        return False, fpr.explain(meta.get("inputs"), unit.inputs)
    if unit.legacy is not None and _as_text(meta.get("fingerprint")) == unit.legacy:
        return True, ""  # made before inputs were recorded, for this very config
    if unit.legacy_sidecar is not None:
        sidecar, legacy = unit.legacy_sidecar
        try:
            old = artifacts.read_json(sidecar) if sidecar.is_file() else {}
        except UserError:
            old = {}
        if "inputs" not in old and old.get("fingerprint") == legacy:
            return True, ""
    return False, LEGACY_STALE


def fresh(path: Path, unit: Unit, say: bool = True) -> bool:
    """``status`` as a bool; an existing but stale artifact is logged with what changed."""
    ok, why = status(path, unit)
    if not ok and why != "missing" and say:
        log.info("%s: redo (%s)", unit.label, why)
    return ok


def require(path: Path, unit: Unit, command: str) -> None:
    """Refuse to read an upstream artifact that is missing or was made for another config, in one line
    naming the file, what changed, and the command that makes it again."""
    ok, why = status(path, unit)
    if ok:
        return
    if why == "missing":
        raise UserError(f"{path}: not found ({unit.label}); run `{command}` into this --out folder first")
    if why == LEGACY_STALE:
        raise UserError(f"{path}: {why}; run `{command}` with this config first")
    raise UserError(f"{path}: made for another config ({why}); run `{command}` with this config first")
