"""The pure core imports nothing that does I/O, reads the clock or draws random numbers.

Time comes into the core as an argument, randomness as a number and health as data; that keeps
every decision reproducible in a unit test. This walks each core module's syntax tree (nested
and conditional imports included) and fails on a forbidden import.

The whole package has no import cycle: the graph is built from every module's syntax tree
(found by walking the folder, so a new module is covered the day it is written), counting
imports under `if TYPE_CHECKING:` too, since a type-only import is a dependency all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "proxy"
CORE = (
    "spec",
    "schema",
    "config",
    "table",
    "routing",
    "sticky",
    "headers",
    "health",
    "stats",
    "rollout",
    "sequential",
)
# Modules that must exist now; the others are checked as soon as they are written.
REQUIRED = ("spec", "table", "routing", "sticky")
FORBIDDEN = frozenset(
    {
        "asyncio",
        "aiohttp",
        "socket",
        "os",
        "time",
        "random",
        "prometheus_client",
        "uvloop",
        "httptools",
        "subprocess",
        "threading",
    }
)


def forbidden_imports(source: str) -> list[str]:
    """Top-level names of forbidden modules imported anywhere in `source`."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.extend(name for name in names if name.split(".")[0] in FORBIDDEN)
    return found


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports(module: str) -> None:
    path = PACKAGE / f"{module}.py"
    if not path.exists():
        assert module not in REQUIRED, f"core module {module}.py is missing"
        pytest.skip(f"{module}.py is not written yet")
    assert forbidden_imports(path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import os", ["os"]),
        ("import os.path as p", ["os.path"]),
        ("from time import monotonic", ["time"]),
        ("def f():\n    import random\n", ["random"]),
        ("try:\n    import uvloop\nexcept ImportError:\n    pass\n", ["uvloop"]),
        ("from asyncio.events import AbstractEventLoop", ["asyncio.events"]),
        ("import math, socket", ["socket"]),
        ("from . import os", []),
        ("import timeit, osmium", []),
        ("from proxy.table import Table", []),
    ],
)
def test_checker_catches_forbidden_imports(source: str, expected: list[str]) -> None:
    assert forbidden_imports(source) == expected


# ---- no import cycles anywhere in the package ----------------------------------------------


def module_names(package: Path) -> dict[str, Path]:
    """Every module of `package` (sub-packages included) by dotted name."""
    modules: dict[str, Path] = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, is_package: bool, source: str, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` imports anywhere: at the top, in a function,
    under `if TYPE_CHECKING:` (an annotation-only import is still a dependency of the design).
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                # `import proxy.a.b` depends on proxy.a.b (and runs proxy.a's __init__).
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                # In a package's __init__, `.` is the package itself.
                cut = node.level - 1 if is_package else node.level
                base = base[: len(base) - cut] if cut else base
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            # `from proxy import rollout` imports the module proxy.rollout.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {module for module in found if module in known and module != name}


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    modules = module_names(package)
    known = set(modules)
    return {
        name: imported_modules(
            name, path.name == "__init__.py", path.read_text(encoding="utf-8"), known
        )
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path `[a, b, ..., a]`, or None when the graph has none."""
    done: set[str] = set()
    for root in sorted(graph):
        if root in done:
            continue
        # Depth-first with an explicit stack: the path from the root is the current chain.
        path = [root]
        on_path = {root}
        pending = [iter(sorted(graph[root]))]
        while pending:
            child = next(pending[-1], None)
            if child is None:
                pending.pop()
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
                continue
            if child in on_path:
                return [*path[path.index(child) :], child]
            if child not in done:
                path.append(child)
                on_path.add(child)
                pending.append(iter(sorted(graph.get(child, ()))))
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph(PACKAGE)
    assert {"proxy.dataplane", "proxy.worker", "proxy.accesslog"} <= set(graph)
    assert "proxy.dataplane" in graph["proxy.worker"], "the graph misses a plain import"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_access_log_knows_nothing_of_the_data_plane() -> None:
    assert import_graph(PACKAGE)["proxy.accesslog"] == set()


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}, None),  # a diamond is no cycle
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": {"d"}, "d": {"b"}}, ["b", "c", "d", "b"]),
        ({"x": set(), "y": {"z"}, "z": {"y"}}, ["y", "z", "y"]),
    ],
)
def test_cycle_finder(graph: dict[str, set[str]], expected: list[str] | None) -> None:
    assert find_cycle(graph) == expected


def test_graph_reads_every_kind_of_import(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import leaf\n")
    (package / "sub" / "leaf.py").write_text("from .. import top\n")
    (package / "top.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import pkg.plain\n"
        "if TYPE_CHECKING:\n    from pkg.typing_only import T\n"
        "def f():\n    from pkg import nested\n"
    )
    for name in ("plain", "typing_only", "nested"):
        (package / f"{name}.py").write_text("import os\n")
    graph = import_graph(package)
    assert graph["pkg.top"] == {"pkg", "pkg.plain", "pkg.typing_only", "pkg.nested"}
    assert graph["pkg.sub"] == {"pkg.sub.leaf"}
    assert graph["pkg.sub.leaf"] == {"pkg", "pkg.top"}
    assert graph["pkg.plain"] == set()
