"""Fingerprints from the inputs a unit actually reads, stored beside the hash so a redo can say why.

A unit (prepared data, the teacher, a prep stage, a set, an encoder, an evaluation unit, a fine-tune
checkpoint) is described by its *inputs*:

- ``config``: the leaf config values it reads (``{"teacher.lr": 0.05, ...}``), not whole sub-trees,
  leaving out every value equal to its key's *neutral* value (the value that reproduces what ssdd did
  before the key existed), so that adding a key with a neutral default changes no fingerprint;
- ``recorded``: leaves that change only rounding or metadata (``config.Role`` ``numerics`` / ``meta``):
  kept in the artifact for the record, never hashed;
- ``upstream``: the fingerprints of the artifacts it loads (the teacher's, the set's, ...), so a stale
  upstream cannot be laundered into a fresh-looking result;
- ``code``: a version per stage or method, bumped when its numbers change on purpose;
- ``unit``: what identifies the unit itself (method, seed index, architecture, target).

The fingerprint is a hash of everything but ``recorded``. How each config key counts is declared next
to the key (a ``ROLES`` table beside each config section: core sections in :mod:`ssdd.config`, a method's
in its module); a test checks that every key declares it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ssdd.config import NO_NEUTRAL, Role, roles_of

FORMAT = 2  # bump only for a deliberate invalidation of every artifact (1: the sub-tree hashes, fingerprint_legacy)

# Code versions: bump one when a change moves that stage's numbers on purpose (methods carry their own,
# ``register(..., version=)``).
STAGE_CODE = {"prepare": 1, "teacher": 1, "prep": 1, "pretrain": 1, "evaluate": 1, "kd": 1, "finetune": 1}


@dataclasses.dataclass(frozen=True)
class Leaf:
    path: str
    value: Any
    role: Role


def leaves(obj: Any, prefix: str = "") -> Iterator[Leaf]:
    """Every leaf of a config dataclass, with its declared role (``teacher.model.norm`` takes
    ``ModelConfig``'s role for ``norm``)."""
    roles = roles_of(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaves(value, f"{prefix}{f.name}.")
        else:
            yield Leaf(f"{prefix}{f.name}", _plain(value), roles[f.name])


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples as lists, as a JSON file holds them


def select(cfg: Any, keys: Iterable[str], exclude: Iterable[str] = ()) -> list[Leaf]:
    """The leaves under each of ``keys`` (a leaf path, or a section: every leaf below it), minus those
    under ``exclude``."""
    keys, exclude = tuple(keys), tuple(exclude)

    def under(path: str, prefixes: tuple[str, ...]) -> bool:
        return any(path == p or path.startswith(p + ".") for p in prefixes)

    return [leaf for leaf in leaves(cfg) if under(leaf.path, keys) and not under(leaf.path, exclude)]


def config_inputs(chosen: Iterable[Leaf]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(hashed, recorded): result leaves not at their neutral value, and the rounding/metadata leaves."""
    hashed, recorded = {}, {}
    for leaf in chosen:
        if leaf.role.affects != "result":
            recorded[leaf.path] = leaf.value
        elif leaf.role.neutral is NO_NEUTRAL or leaf.value != _plain(leaf.role.neutral):
            hashed[leaf.path] = leaf.value
    return hashed, recorded


def inputs(kind: str, code: int, chosen: Iterable[Leaf] = (), upstream: Mapping[str, Any] | None = None,
           **unit: Any) -> dict[str, Any]:
    """The canonical inputs of one unit (see the module docstring)."""
    hashed, recorded = config_inputs(chosen)
    out: dict[str, Any] = {"kind": kind, "code": code, "unit": _plain(unit), "config": hashed,
                           "upstream": _plain(dict(upstream or {}))}
    if recorded:
        out["recorded"] = recorded
    return out


def of(inputs_: Mapping[str, Any]) -> str:
    """The fingerprint of some inputs: a short hash of all but ``recorded``."""
    hashed = {k: v for k, v in inputs_.items() if k != "recorded"}
    blob = json.dumps({"format": FORMAT, **hashed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}." if key not in ("config", "recorded") or prefix else ""))
        return out
    return {prefix[:-1]: tree}


def explain(stored: Mapping[str, Any] | None, current: Mapping[str, Any]) -> str:
    """What changed, in one line: ``distill.krr_st.lr_images 0.0001 -> 0.0002; upstream.teacher a1 -> b2``
    (``recorded`` values are left out: they do not make a redo)."""
    if not stored:
        return "made before inputs were recorded"
    old = _flat({k: v for k, v in stored.items() if k != "recorded"})
    new = _flat({k: v for k, v in current.items() if k != "recorded"})
    parts = []
    for key in sorted(set(old) | set(new)):
        if key not in new:
            parts.append(f"{key} {_short(old[key])} -> (default)")
        elif key not in old:
            parts.append(f"{key} (default) -> {_short(new[key])}")
        elif old[key] != new[key]:
            parts.append(f"{key} {_short(old[key])} -> {_short(new[key])}")
    return "; ".join(parts) or "same inputs, other fingerprint format"


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."
