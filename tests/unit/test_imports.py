"""The package's import graph: no cycle, rooms in one order, heavy libraries off the light paths.

Built from the source (every `import` and `from ... import`, at the top of a module and inside
functions), so a cycle hidden in a function or under TYPE_CHECKING counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "emotr"
HEAVY = ("tensorflow", "keras", "ray", "mlflow", "optuna")
# Deferring these is right too, where a light command would pay for them: pandas and pyarrow
# take ~0.5 s, numpy and Pillow ~0.2 s, which `emotr --help` does not need.
DEFERRABLE = (*HEAVY, "pandas", "pyarrow", "numpy", "PIL")
# The rooms from the top down: a module may import its own room and the rooms after it.
# `compat`: emotr.serving, which versions registered before the subpackages import.
ORDER = [
    "compat",
    "cli",
    "serve",
    "pipeline",
    "ops",
    "insight",
    "deploy",
    "search",
    "extract",
    "cache",
    "data",
    "leaves",
]
LEAVES = {
    "config",
    "serve_config",
    "config_io",
    "hyperparams",
    "errors",
    "storage",
    "redaction",
    "track",
    "taps",
    "hardware",
}
# Modules that `emotr --help`, `emotr cache ls` and a warm `emotr extract` load (with what
# they import at the top): none may import a heavy library at its top.
LIGHT_ROOTS = [
    "emotr.cli",
    "emotr.cli.main",
    "emotr.pipeline",
    "emotr.cache.maintenance",
    "emotr.data.index",
    "emotr.extract.driver",
]


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name."""
    return {module_name(path, package): path for path in sorted(package.rglob("*.py"))}


def imports_of(
    path: Path, modules: dict[str, Path], top_only: bool = False, package: Path = PACKAGE
) -> set[str]:
    """The emotr modules `path` imports (`from emotr.x import y` counts y when y is a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    own = module_name(path, package)
    return {name for name in found if name in modules and name != own}


def heavy_top_imports(path: Path, heavy: tuple[str, ...] = HEAVY) -> set[str]:
    """The heavy libraries a module imports at its top (not in functions, not TYPE_CHECKING)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found |= {name.split(".")[0] for name in names if name.split(".")[0] in heavy}
    return found


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = all_modules(package)
    return {name: imports_of(path, modules, package=package) for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that starts and ends on the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for other in sorted(edges.get(node, ())):
            # A package's __init__ re-exporting its own module is not a cycle of the rooms.
            if other.startswith(node + "."):
                continue
            if state.get(other) == 1:
                return [*path[path.index(other) :], other]
            if other not in state and (cycle := visit(other)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def room_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "leaves"  # emotr/__init__.py
    if parts[1] == "serving":
        return "compat"
    return "leaves" if parts[1] in LEAVES else parts[1]


def test_the_package_has_no_import_cycle():
    assert find_cycle(graph()) is None, f"import cycle: {' -> '.join(find_cycle(graph()))}"


def test_a_cycle_is_found_where_one_is_added(tmp_path: Path):
    # The guard itself: a copy of the package with one edge added back from a leaf.
    copy = tmp_path / "emotr"
    for path in PACKAGE.rglob("*.py"):
        target = copy / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    errors = copy / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _x():\n    from emotr.config import Config\n")

    cycle = find_cycle(graph(copy))

    assert cycle is not None and {"emotr.errors", "emotr.config"} <= set(cycle)


def test_rooms_import_only_themselves_and_the_rooms_below():
    wrong = []
    for module, imported in graph().items():
        rank = ORDER.index(room_of(module))
        for other in imported:
            if ORDER.index(room_of(other)) < rank:
                wrong.append(f"{module} -> {other}")
    assert not wrong, "imports that point up: " + ", ".join(sorted(wrong))


def test_every_room_says_what_it_is_for_and_what_it_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        docstring = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in docstring, f"{init} needs a docstring saying what it may import"


def test_light_commands_load_no_heavy_library_at_the_top_of_a_module():
    modules = all_modules()
    seen, todo = set(), list(LIGHT_ROOTS)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += imports_of(modules[name], modules, top_only=True)
        # Importing emotr.a.b runs emotr/a/__init__.py first.
        todo += [p for p in (name.rsplit(".", 1)[0],) if p in modules and p != name]
    heavy = {name: heavy_top_imports(modules[name]) for name in sorted(seen)}
    assert not {name: libs for name, libs in heavy.items() if libs}


@pytest.mark.parametrize("module", sorted(all_modules()))
def test_in_function_imports_of_emotr_modules_are_only_where_they_defer_a_heavy_library(module):
    # An in-function import of a module whose top imports nothing heavy hides the structure.
    modules = all_modules()
    tree = ast.parse(modules[module].read_text())
    top = {id(node) for node in tree.body}
    top |= {id(inner) for node in tree.body if _is_type_checking(node) for inner in ast.walk(node)}
    hidden = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and id(node) not in top and node.level == 0:
            # `from emotr import pipeline` imports the module emotr.pipeline.
            named = [f"{node.module}.{alias.name}" for alias in node.names]
            for name in [n for n in named if n in modules] or [node.module or ""]:
                if name in modules and not _loads_heavy(name, modules):
                    hidden.append(f"line {node.lineno}: {name}")
    assert not hidden, (
        f"{module} imports inside functions what it could import at the top: {hidden}"
    )


def _is_type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _loads_heavy(name: str, modules: dict[str, Path], seen: set[str] | None = None) -> bool:
    """Whether importing `name` imports a heavy library (at the top of it or of what it imports)."""
    seen = set() if seen is None else seen
    if name in seen:
        return False
    seen.add(name)
    if heavy_top_imports(modules[name], DEFERRABLE):
        return True
    return any(
        _loads_heavy(other, modules, seen)
        for other in imports_of(modules[name], modules, top_only=True)
    )
