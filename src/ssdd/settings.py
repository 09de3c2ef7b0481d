"""The whole configuration: the core sections of :mod:`ssdd.config` plus every method's own section.

Why a module of its own: a method declares its options beside itself (``register(name, config=Section)``
in ``ssdd/distill/methods/<name>.py``), but :mod:`ssdd.config` sits below ``ssdd.distill`` (``data/``,
``models/`` and ``teacher/`` import it) and cannot import the methods. This module sits above both: it
imports ``ssdd.distill``, which imports every method module (their registrations hand their sections to
:func:`ssdd.config.add_section`), and then assembles :class:`DistillConfig` and :class:`Config` once, as
plain dataclasses. Make configs here: :func:`load_config` applies a preset and ``--set`` overrides and runs
every check, the core ones and each method section's ``check``, before any work starts.
"""

from __future__ import annotations

from typing import Any

import ssdd.distill  # noqa: F401  (imports every method module: their registrations declare the sections)
from ssdd import config

# the ``distill`` table (the shared options + one field per method section) and the root config
DistillConfig, Config = config.assemble(__name__)


def load_config(preset: str | None = None, overrides: dict[str, Any] | None = None) -> config.Config:
    """Defaults, then the preset file, then the overrides; every check (core and method sections) run."""
    return config.load(Config, preset, overrides)


def valid_keys() -> list[str]:
    """Every settable key (``distill.dm.iterations``, ...)."""
    return config.valid_keys(Config())
