"""The whole configuration: the core sections of :mod:`ssdd.config` plus every method's own section.

Why a module of its own: a method declares its options beside itself (``register(name, config=Section)``
in ``ssdd/distill/methods/<name>.py``), but :mod:`ssdd.config` sits below ``ssdd.distill`` (``data/``,
``models/`` and ``teacher/`` import it) and cannot import the methods. This module sits above both: it
imports ``ssdd.distill``, which imports every method module (their registrations hand their sections to
:func:`ssdd.config.add_section`), and then assembles :class:`DistillConfig` and :class:`Config` once, as
plain dataclasses. Make configs here: :func:`load_config` applies a preset (a TOML file in ``configs/``)
and ``--set`` overrides and runs every check, the core ones and each method section's ``check``, before any
work starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

import ssdd.distill  # noqa: F401  (imports every method module: their registrations declare the sections)
from ssdd import config
from ssdd.errors import UserError

# the ``distill`` table (the shared options + one field per method section) and the root config
DistillConfig, Config = config.assemble(__name__)


def presets_dir() -> Path:
    """Where presets live: $SSDD_CONFIGS, else the repository's ``configs/``."""
    env = os.environ.get("SSDD_CONFIGS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "configs"


def available_presets() -> list[str]:
    d = presets_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def _preset_path(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".toml":
        if not path.is_file():
            raise UserError(f"--preset: file {name} not found")
        return path
    path = presets_dir() / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"--preset: unknown preset '{name}' (available: {', '.join(available_presets()) or 'none'})")
    return path


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set: expected key=value, got '{pair}'")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def load_config(preset: str | None = None, overrides: dict[str, Any] | None = None) -> config.Config:
    """Defaults, then the preset file, then the overrides; every check (core and method sections) run."""
    cfg = Config()
    if preset:
        path = _preset_path(preset)
        try:
            table = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"--preset: {path} is not valid TOML ({err})") from None
        for key, value in _flatten(table).items():
            config.assign(cfg, key, value, str(path))
    for key, value in (overrides or {}).items():
        config.assign(cfg, key, value, "--set")
    config.validate(cfg)
    return cfg


def valid_keys() -> list[str]:
    """Every settable key (``distill.dm.iterations``, ...)."""
    return config.valid_keys(Config())
