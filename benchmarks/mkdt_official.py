"""The authors' MKDT code (sjoshi804/mkdt-data-distill-ssl), loaded from a checkout named by
``MKDT_OFFICIAL_DIR`` and run unchanged, for ``mkdt_equivalence.py`` and ``mkdt_speed.py``.

Nothing of theirs is copied here. Their distillation step and their expert loop live inside ``main()``
of ``distill.py`` and ``buffer.py`` (with dataset loading, wandb and file writes around them), so
:func:`distill_iteration` and :func:`expert_run` parse those files at run time and execute the statements
of one loop iteration, unchanged, in a namespace that holds what ``main()`` would have set up. Left out:
the save block at the top of each distillation iteration (it calls ``.cuda()`` and writes files) and the
buffer file writes after each expert; the left-out statements are listed by :data:`SKIPPED`.

Imports their modules need but the functions run here never use are stubbed (:func:`stub_missing`):
``wandb`` and ``torchvision`` (their dataset loaders and their ``get_dataset``), which are not installed
here. A stub is a class that refuses to be instantiated and a module whose every attribute is such a
class, so any use of one would raise instead of silently doing something else.
"""

from __future__ import annotations

import ast
import os
import sys
import types
from pathlib import Path
from typing import Any

SKIPPED = {"distill.py": "the save block `if (it == 0) or (log_it in eval_it_pool) ...` (calls .cuda(), writes files)",
           "buffer.py": "the buffer writes after each expert (`print`, `n = 0`, `while ...`, `torch.save`, `trajectories = []`)"}


class _Refused:
    """What a stubbed name gives: usable as a base class, never callable."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a stubbed import of the MKDT code was used (see benchmarks/mkdt_official.py)")


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Refused


STUBBED = ("wandb", "torchvision", "torchvision.datasets", "torchvision.datasets.folder",
           "torchvision.datasets.utils", "torchvision.transforms")


def stub_missing() -> list[str]:
    """Stub the modules of :data:`STUBBED` that cannot be imported here; returns those stubbed."""
    import importlib.util

    done = []
    for name in STUBBED:
        top = name.split(".")[0]
        if name in sys.modules or (top not in done and importlib.util.find_spec(top) is not None):
            continue
        sys.modules[name] = _StubModule(name)
        if "." in name:
            parent, child = name.rsplit(".", 1)
            setattr(sys.modules[parent], child, sys.modules[name])
        done.append(name)
    return done


def unstub(names: list[str]) -> None:
    """Take stubs made by :func:`stub_missing` out of ``sys.modules`` again (tests share one process)."""
    for name in names:
        if isinstance(sys.modules.get(name), _StubModule):
            del sys.modules[name]


def official_dir(path: str | None = None) -> Path:
    """The checkout (``MKDT_OFFICIAL_DIR``); one clear error when it is not one."""
    path = path or os.environ.get("MKDT_OFFICIAL_DIR")
    if not path:
        raise SystemExit("MKDT_OFFICIAL_DIR is not set: point it at a checkout of sjoshi804/mkdt-data-distill-ssl")
    root = Path(path)
    if not (root / "src" / "mkdt" / "distill.py").is_file():
        raise SystemExit(f"MKDT_OFFICIAL_DIR={path}: no src/mkdt/distill.py there")
    return root


class Official:
    """Their modules (``networks``, ``reparam_module``, ``utils``, ``distill``, ``buffer``) and the compiled
    loop bodies of ``distill.py`` and ``buffer.py``."""

    def __init__(self, path: str | None = None):
        root = official_dir(path)
        if str(root / "src") not in sys.path:
            sys.path.insert(0, str(root / "src"))
        self.stubbed = stub_missing()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy.ndimage.interpolation's deprecation, on import
            from mkdt import buffer, distill, networks, reparam_module, utils  # type: ignore
        self.root = root
        self.networks, self.reparam_module, self.utils = networks, reparam_module, utils
        self.distill, self.buffer = distill, buffer
        self.iteration = _loop_body(Path(distill.__file__), "it", skip_first_if=True)
        self.expert = _loop_body(Path(buffer.__file__), "it", stop_after="trajectories.append")


def _loop_body(file: Path, target: str, skip_first_if: bool = False, stop_after: str | None = None) -> types.CodeType:
    """The statements of ``main()``'s ``for <target> in ...`` loop in ``file``, compiled with their own file
    name and line numbers (tracebacks point into their code)."""
    tree = ast.parse(file.read_text(), str(file))
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    loop = next(n for n in ast.walk(main) if isinstance(n, ast.For) and isinstance(n.target, ast.Name)
                and n.target.id == target)
    body = list(loop.body)
    if skip_first_if:  # distill.py: `log_it = it + 1`, then the save block
        first_if = next(i for i, s in enumerate(body) if isinstance(s, ast.If))
        body = body[:first_if] + body[first_if + 1:]
    if stop_after is not None:
        end = next(i for i, s in enumerate(body) if stop_after in ast.unparse(s))
        body = body[:end + 1]
    module = ast.Module(body=body, type_ignores=[])
    return compile(module, str(file), "exec")


def run(code: types.CodeType, namespace: dict[str, Any]) -> dict[str, Any]:
    """Execute a loop body in ``namespace`` (updated in place, as ``main()``'s locals would be)."""
    exec(code, namespace)
    return namespace
