"""The package's shape: layers import only downwards (import-linter's contract in pyproject.toml), no module is in
an import cycle, and no function hides an import of the package (which is how cycles used to be dodged)."""

import ast
import subprocess
import sys
from pathlib import Path

import grimp

from nycdata.params import REPO_ROOT

PACKAGE = REPO_ROOT / "nycdata"
LAZY_IMPORTS_ALLOWED = {"__main__.py"}  # the CLI loads each subcommand's stack only when that command runs


def test_lint_imports_keeps_the_layers_contract():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            found.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_module_is_in_an_import_cycle():
    assert {"a", "b"} in _strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}})  # the check sees a cycle
    graph = grimp.build_graph("nycdata")
    modules = {m for m in graph.modules if m.startswith("nycdata")}
    edges = {m: {o for o in graph.find_modules_directly_imported_by(m) if o in modules} for m in modules}
    cycles = [sorted(c) for c in _strongly_connected(edges) if len(c) > 1]
    assert cycles == []


def test_no_function_imports_the_package():
    hidden = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in LAZY_IMPORTS_ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                hidden += [f"{path.relative_to(REPO_ROOT)}:{sub.lineno} {sub.module}" for sub in ast.walk(node)
                           if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("nycdata")]
    assert hidden == []
