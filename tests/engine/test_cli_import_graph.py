"""The modules of vrex/cli import each other without cycles, counting imports inside functions too
(a lazy ``from vrex.cli.bench import _log`` in soak.py, with bench.py importing soak.py, was one)."""

from __future__ import annotations

import ast
from pathlib import Path

CLI = Path(__file__).resolve().parents[2] / "vrex" / "cli"


def cli_imports(root: Path) -> dict[str, set[str]]:
    """module name -> the vrex.cli modules it imports anywhere in its file."""
    names = {p.stem for p in root.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("vrex.cli."):
                    deps.add(node.module.split(".")[2])
                elif node.module == "vrex.cli":
                    deps |= {a.name for a in node.names if a.name in names}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[2] for a in node.names if a.name.startswith("vrex.cli.")}
        graph[path.stem] = deps - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_lazy_import(tmp_path):
    (tmp_path / "a.py").write_text("from vrex.cli.b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from vrex.cli.a import y\n")
    (tmp_path / "c.py").write_text("from vrex.cli import a\n")
    assert find_cycle(cli_imports(tmp_path)) == ["a", "b", "a"]


def test_cli_modules_import_without_cycles():
    graph = cli_imports(CLI)
    assert {"bench", "soak", "options"} <= set(graph)
    assert find_cycle(graph) is None, f"import cycle in vrex/cli: {' -> '.join(find_cycle(graph))}"
