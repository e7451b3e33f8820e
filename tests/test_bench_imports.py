"""bench/ has no import cycle: every import between its modules, at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _imports(path: Path) -> set[str]:
    """The bench modules that ``path`` imports, by module name (``harness``, ``report`` ...)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                found.update(a.name for a in node.names)
            elif node.module and node.module.split(".")[0] == "bench":
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "bench" and len(parts) > 1:
                    found.add(parts[1])
    return found


def _graph(folder: Path) -> dict[str, set[str]]:
    modules = {p.stem: p for p in folder.glob("*.py")}
    return {name: _imports(path) & set(modules) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_bench_has_no_import_cycle():
    graph = _graph(BENCH)
    assert {"harness", "report", "plots"} <= set(graph)
    cycle = _cycle(graph)
    assert cycle is None, "import cycle in bench/: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    "graph, has_cycle",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
        ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, False),
        ({"a": set(), "b": {"b2"}, "b2": {"b"}}, True),
    ],
)
def test_the_cycle_finder_finds_cycles(graph, has_cycle):
    assert (_cycle(graph) is not None) == has_cycle


def test_lazy_imports_count(tmp_path):
    # The cycle the test guards against was made of imports inside functions.
    (tmp_path / "a.py").write_text("def f():\n    from . import b\n")
    (tmp_path / "b.py").write_text("from .a import f\n")
    assert _cycle(_graph(tmp_path)) == ["a", "b", "a"]
