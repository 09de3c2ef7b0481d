"""The import layering of ``src/ssdd``, read from the source with ``ast`` (nothing is imported):

1. a method (``ssdd.distill.methods.*``) never imports another method, nor ``ssdd.distill`` itself
   (its face imports every method);
2. an engine (``ssdd.distill.engines.*``) never imports a method nor ``ssdd.distill``, and registers nothing;
3. no import cycle among ssdd modules, counting module-level imports (those inside functions run later);
   inside ``ssdd.distill`` none even counting the imports inside functions (a lazy import dodging a cycle).

Rules 1 and 2 count every import, also those inside functions. An import names the most specific ssdd
module it loads: ``from a.b import c`` is ``a.b.c`` when that is a module, else ``a.b``. The parent
packages Python runs first are not counted (every package whose ``__init__`` imports its own modules
would otherwise be a cycle).
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path

METHODS = "ssdd.distill.methods"
ENGINES = "ssdd.distill.engines"
FACE = "ssdd.distill"


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the ssdd module it loads
    line: int
    top_level: bool  # runs when the module is imported (not inside a function, nor under TYPE_CHECKING)
    names: tuple[str, ...]  # the names a ``from`` import takes

    def __str__(self) -> str:
        return f"{self.source} (line {self.line}) imports {self.target}"


def source_root() -> Path:
    spec = importlib.util.find_spec("ssdd")  # the package on sys.path (PYTHONPATH can point at another tree)
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = ("ssdd",) + path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(name: str, path: Path, known: set[str]) -> list[Import]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def resolve(module: str) -> str | None:
        while module and module not in known:
            module = module.rpartition(".")[0]
        return module or None

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.If) and _type_checking(child):
                visit(child, False)
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    target = resolve(alias.name)
                    if target:
                        found.append(Import(name, target, child.lineno, top, ()))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[:len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    target = resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in known else resolve(base)
                    if target:
                        found.append(Import(name, target, child.lineno, top, (alias.name,)))
            else:
                visit(child, top)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def all_imports() -> list[Import]:
    mods = modules(source_root())
    return [imp for name, path in mods.items() for imp in imports(name, path, set(mods))]


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_layout_exists():
    mods = modules(source_root())
    assert METHODS in mods and ENGINES in mods, "src/ssdd/distill has no methods/ and engines/ packages"


def test_no_method_imports_another_method():
    bad = [str(imp) for imp in all_imports()
           if imp.source.startswith(METHODS + ".") and imp.target != imp.source
           and (_inside(imp.target, METHODS) or imp.target == FACE)]
    assert not bad, "a method imports another method (move what they share to ssdd.distill.engines): " + "; ".join(bad)


def test_engines_import_no_method_and_register_nothing():
    found = [imp for imp in all_imports() if _inside(imp.source, ENGINES)]
    bad = [str(imp) for imp in found if _inside(imp.target, METHODS) or imp.target == FACE]
    assert not bad, "an engine imports a method: " + "; ".join(bad)
    registering = [f"{imp} for {name}" for imp in found for name in imp.names if name in ("register", "register_prep")]
    assert not registering, "an engine registers (registrations belong in ssdd.distill.methods): " + "; ".join(registering)


def cycles(found: list[Import]) -> list[str]:
    """One cycle (``a (line n) -> b ... -> a``) for each edge that closes one in a depth-first walk."""
    graph: dict[str, dict[str, Import]] = {}
    for imp in found:
        if imp.target != imp.source:
            graph.setdefault(imp.source, {}).setdefault(imp.target, imp)
    out, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == "open":
                ring = stack[stack.index(nxt):] + [nxt]
                out.append(" -> ".join(f"{a} (line {graph[a][b].line})" for a, b in zip(ring, ring[1:])) + f" -> {nxt}")
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return out


def test_no_import_cycle_among_module_level_imports():
    found = cycles([imp for imp in all_imports() if imp.top_level])
    assert not found, "import cycles among module-level imports:\n" + "\n".join(found)


def test_no_import_cycle_within_distill_even_through_imports_inside_functions():
    """A lazy import must not dodge a cycle inside ssdd.distill (it did: krr_st <-> check)."""
    found = cycles([imp for imp in all_imports() if _inside(imp.source, FACE) and _inside(imp.target, FACE)])
    assert not found, "import cycles in ssdd.distill (counting imports inside functions):\n" + "\n".join(found)
