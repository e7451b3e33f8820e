"""Import structure: ``import fastfib`` stays light, and fastfib/ has no import cycles.

(bench/ has its own import-cycle test, from the perf work on issue 13.)
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_fastfib_and_fib_do_not_load_pika():
    code = ("import sys, fastfib; assert fastfib.fib(10) == 55; import fastfib.config, fastfib.server.settings;"
            "print(sorted(m for m in sys.modules if m == 'pika' or m.startswith('pika.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_blocking_client_is_still_importable_from_the_package():
    import fastfib
    from fastfib.client import FibonacciRpcClient

    assert fastfib.FibonacciRpcClient is FibonacciRpcClient
    with pytest.raises(AttributeError):
        fastfib.no_such_name  # noqa: B018


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that the module ``name`` (at ``path``) imports, anywhere in it
    (function-level imports count: a lazy import hides a cycle, it does not remove it), except
    under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:  # a name imported from a module: the module
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                full = f"{module}.{alias.name}"
                add(full if full in known else module)
    return found


def _cycles(top: str, root: Path = ROOT) -> list[list[str]]:
    paths = {_module_name(p, root): p for p in (root / top).rglob("*.py")}
    known = set(paths)
    graph = {name: _imports(path, name, known) for name, path in paths.items()}
    # A package's __init__ is imported before any of its submodules: submodule -> package edges are
    # implied by Python, so only count the ones written down (above).
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_no_import_cycles_in_fastfib():
    assert _cycles("fastfib") == []


def test_the_cycle_finder_finds_cycles_even_through_lazy_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    assert _cycles("pkg", tmp_path) == [["pkg.a", "pkg.b", "pkg.a"]]


_PIKA_LOADED = "import sys; print(sorted(m for m in sys.modules if m == 'pika' or m.startswith('pika.')))"


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["call", "--help"], ["health", "--help"],
                                  ["health", "--no-broker", "--metrics-url", "http://127.0.0.1:9/"]])
def test_the_cli_loads_pika_only_when_it_talks_to_the_broker(argv):
    """The CLI's parser used to import fastfib.client (for the default timeout): pika for every command."""
    code = ("import sys; from fastfib import cli\n"
            f"try:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass\n" + _PIKA_LOADED)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_cli_call_still_loads_pika_when_it_calls():
    # The other side of the test above: a call needs the client, so it must load pika (here: an unreachable URL).
    code = ("import sys; from fastfib import cli\n"
            "try:\n    cli.main(['call', '5', '--url', 'amqp://guest:guest@127.0.0.1:9/%2F', '--timeout', '1'])\n"
            "except SystemExit:\n    pass\n" + _PIKA_LOADED)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "'pika'" in out.stdout.strip().splitlines()[-1]
