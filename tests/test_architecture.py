"""The layout's contracts, read from the source: no import circles, no borrowed private names,
stages that depend only downstream-to-upstream, and Qt only in the plugin."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "pseudohealthy"
STAGES = ("data", "model", "engine", "evaluation", "training", "figures")
# A stage may import only the stages before it in this order (and the cross-cutting top-level modules).
STAGE_ORDER = {"data": 0, "model": 1, "engine": 2, "figures": 2, "evaluation": 3, "training": 4}
TOP_LEVEL = {"pseudohealthy", "pseudohealthy.errors", "pseudohealthy.device", "pseudohealthy.__main__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every ``pseudohealthy`` import in ``path`` (outside TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    package = ""
    if path.is_relative_to(PACKAGE):
        package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join([*base, module] if module else base)
            if module.split(".")[0] == "pseudohealthy":
                found.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "pseudohealthy"]
    return found


def _source_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p) for p in _source_files()}
    graph: dict[str, set[str]] = {}
    for path in _source_files():
        deps = set()
        for module, names in _imports(path):
            # `from pkg import submodule` depends on the submodule
            subs = {f"{module}.{n}" for n in names if f"{module}.{n}" in modules}
            deps |= subs or {module}
        graph[_module_name(path)] = {d for d in deps if d in modules} - {_module_name(path)}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep.startswith(node + "."):  # a package importing its own submodule is no circle
                continue
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_circle() -> None:
    graph = _graph()
    assert len(graph) > 40  # the walk sees the whole package
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_circle_check_can_fail() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("folder", ["src", "benchmarks", "scripts"])
def test_no_module_borrows_another_modules_private_names(folder: str) -> None:
    offenders = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for module, names in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private or any(
                part.startswith("_") and not part.startswith("__") for part in module.split(".")
            ):
                inside_napari = module.startswith("pseudohealthy.napari") and "napari" in path.parts
                if not inside_napari:  # the plugin's own private modules (npe2 layout) stay inside it
                    offenders.append(f"{path.relative_to(ROOT)}: from {module} import {', '.join(names)}")
    assert not offenders, "\n".join(offenders)


def test_stages_import_only_upstream_stages() -> None:
    wrong = []
    for module, deps in _graph().items():
        stage = module.split(".")[1] if module.count(".") >= 1 else None
        if stage not in STAGE_ORDER:
            continue
        for dep in deps:
            dep_stage = dep.split(".")[1] if dep.count(".") >= 1 else None
            if dep in TOP_LEVEL or dep_stage == stage or dep_stage not in STAGE_ORDER:
                if dep_stage in ("cli", "napari"):
                    wrong.append(f"{module} -> {dep}")
                continue
            if STAGE_ORDER[dep_stage] >= STAGE_ORDER[stage]:
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "\n".join(sorted(wrong))


def test_every_stage_says_what_it_owns() -> None:
    for stage in STAGES:
        init = PACKAGE / stage / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc) > 40, f"{init} needs a docstring saying what the stage owns"
        for module in sorted((PACKAGE / stage).glob("*.py")):
            assert ast.get_docstring(ast.parse(module.read_text(encoding="utf-8"))), (
                f"{module} has no docstring"
            )


def test_only_the_plugin_imports_qt_or_napari() -> None:
    offenders = []
    for path in _source_files():
        if "napari" in path.relative_to(PACKAGE).parts[:1]:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            for name in names:
                top = name.split(".")[0]
                if top in ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt"):
                    if path.relative_to(PACKAGE).parts[:2] != ("cli", "view.py"):  # `view` starts napari
                        offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders, "\n".join(offenders)
