"""The package's shape: no import cycle between its modules, and a public
API that is what the docs say."""

from __future__ import annotations

import ast
from pathlib import Path

import flask_durable

PACKAGE = Path(flask_durable.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every package module ``path`` imports, wherever the import is (in a
    function, under ``if TYPE_CHECKING:``, ...)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from . import signals`` imports a module; ``from .x import y``
            # imports x (and y, when y is a module of its own).
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    # A module's own packages are imported before it in any case (and
    # ``from . import signals`` names the package only to reach signals).
    return {t for t in found if not name.startswith(t + ".")}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, modules) for p in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module
    (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package() -> None:
    graph = import_graph()
    assert "flask_durable.lifecycle" in graph
    assert "flask_durable.store.sqlite" in graph["flask_durable.store"]
    assert cycles(graph) == []


def test_lower_modules_do_not_import_the_lifecycle() -> None:
    """The run state machine hands lower modules narrow collaborators; none
    of them reaches back up to it."""
    graph = import_graph()
    upper = {
        "flask_durable",
        "flask_durable.extension",
        "flask_durable.views",
        "flask_durable.api",
        "flask_durable.dashboard",
        "flask_durable.cli",
        "flask_durable.lifecycle",
        "flask_durable.testing",
        "flask_durable.pytest_plugin",
    }
    for module, imported in graph.items():
        if module not in upper:
            assert "flask_durable.lifecycle" not in imported, module


def test_only_the_store_speaks_sql() -> None:
    for path in PACKAGE.rglob("*.py"):
        if "store" in path.relative_to(PACKAGE).parts:
            continue
        text = path.read_text()
        for word in ("UPDATE durable_", "INSERT INTO", "SELECT "):
            assert word not in text, (path.name, word)


def test_public_names() -> None:
    assert set(flask_durable.__all__) == {
        "Durable",
        "NonRetriableError",
        "RetryAfterError",
        "RunInfo",
        "RunStatus",
        "StepError",
        "StepInfo",
        "current_run",
        "current_step",
        "step",
    }
    assert flask_durable.RunStatus.COMPLETED == "completed"
    assert str(flask_durable.RunStatus.QUEUED) == "queued"
    assert [s.value for s in flask_durable.RunStatus] == [
        "running",
        "scheduled",
        "sleeping",
        "waiting",
        "queued",
        "completed",
        "failed",
        "cancelled",
    ]
