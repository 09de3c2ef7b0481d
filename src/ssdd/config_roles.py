"""How each config key enters the fingerprints of the units that read it (:mod:`ssdd.fingerprint`): its
:class:`Role`. Every section declares a ``ROLES`` table beside its fields (:func:`roles`), checked by
:func:`roles_of` to name every field exactly."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

NO_NEUTRAL = type("NoNeutral", (), {"__repr__": lambda self: "NO_NEUTRAL"})()  # in the first fingerprinted schema


@dataclass(frozen=True)
class Role:
    """How a config key enters the fingerprints of the units that read it.

    ``affects``: "result" (hashed), "numerics" (changes rounding only) or "meta" (changes neither the numbers
    nor what a unit computes); the last two are recorded in artifacts, not hashed. ``neutral``: the value that
    reproduces ssdd's behaviour from before the key existed; a value equal to it is left out of fingerprints,
    so adding a key with a neutral default redoes nothing. Every key added from now on needs one."""

    affects: str = "result"
    neutral: Any = NO_NEUTRAL


RESULT, NUMERICS, META = Role(), Role("numerics"), Role("meta")


def neutral(value: Any) -> Role:
    """A result key whose ``value`` is what ssdd did before the key existed."""
    return Role("result", value)


def roles(results: str, **others: Role) -> dict[str, Role]:
    """A dataclass's ``ROLES``: the space-separated ``results`` are plain result keys, ``others`` the rest."""
    table = {name: RESULT for name in results.split()}
    table.update(others)
    return table


def roles_of(cls: type) -> dict[str, Role]:
    """``cls.ROLES``, checked to name every field of ``cls`` exactly (a key without a role is a bug)."""
    table = getattr(cls, "ROLES", None)
    names = [f.name for f in dataclasses.fields(cls)]
    if table is None or set(table) != set(names):
        missing = sorted(set(names) - set(table or {}))
        extra = sorted(set(table or {}) - set(names))
        raise TypeError(f"{cls.__name__}.ROLES must give every field a fingerprint role "
                        f"(missing: {missing}, unknown: {extra})")
    return table
