"""The package's shape: no import cycle, no reach into another module's privates, small
modules, and arraysnap.testing never imported by the library."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "src" / "arraysnap"
# Modules allowed past MAX_LINES, each for the reason docs/architecture.md gives.
MAX_LINES = 600
LONGER = {"arraysnap.store"}


def modules() -> dict[str, Path]:
    found = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = file
    return found


def imports_of(name: str, file: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports, at the top or inside functions."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        found.update(t for t in targets if t in known and t != name)
    return found


def test_the_package_has_no_import_cycle():
    known = modules()
    # A package's __init__ re-exports its parts: an edge into it is an edge to a leaf API.
    graph = {name: {m for m in imports_of(name, file, known) if known[m].name != "__init__.py"}
             for name, file in known.items()}
    cycles = []

    def visit(node: str, path: list[str], done: set[str]) -> None:
        for child in sorted(graph[node]):
            if child in path:
                cycles.append(" -> ".join([*path[path.index(child):], child]))
            elif child not in done:
                done.add(child)
                visit(child, [*path, child], done)

    for name in graph:
        visit(name, [name], set())
    assert not cycles, cycles[:5]


def test_a_cycle_would_be_found(tmp_path):
    """The check above can fail: a planted pair of modules importing each other is a cycle."""
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import y\n")
    known = {"p.a": tmp_path / "a.py", "p.b": tmp_path / "b.py"}
    assert imports_of("p.a", known["p.a"], known) == {"p.b"}
    assert imports_of("p.b", known["p.b"], known) == {"p.a"}


def private_reaches(source: str) -> list[str]:
    """``x._name`` where `x` is not self/cls and no class or function of this very module
    defines ``_name``: a reach into another module's private attributes."""
    tree = ast.parse(source)
    own = {node.name for node in ast.walk(tree)
           if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name) and node.value.id == "self"):
            own.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            own.add(node.target.id)
        elif isinstance(node, ast.Assign):
            own.update(t.id for t in node.targets if isinstance(t, ast.Name))
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__") and node.attr not in own
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_reaches_into_another_modules_privates(name):
    assert private_reaches(modules()[name].read_text()) == []


def test_a_reach_into_privates_would_be_found():
    assert private_reaches("def f(store):\n    return store._catalog\n") == [
        "line 2: store._catalog"]
    assert private_reaches("class A:\n    def __init__(self):\n        self._x = 1\n"
                           "def f(a):\n    return a._x\n") == []


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_stay_small(name):
    lines = modules()[name].read_text().count("\n")
    assert lines <= MAX_LINES or name in LONGER, f"{name} has {lines} lines"


def test_every_longer_module_is_explained_in_the_architecture_page():
    page = (REPO / "docs" / "architecture.md").read_text()
    for name in LONGER:
        path = name.replace("arraysnap.", "").replace(".", "/") + ".py"
        assert re.search(rf"`{re.escape(path)}`[^\n]*longer", page), path


@pytest.mark.parametrize("name", sorted(n for n in modules() if not n.startswith(
    "arraysnap.testing") and n != "arraysnap.torture"))
def test_the_library_never_imports_its_test_harness(name):
    imported = imports_of(name, modules()[name], modules())
    assert not any(m.startswith("arraysnap.testing") for m in imported), imported
