"""vrex/models, vrex/train and vrex/engine import each other's modules without cycles, imports inside functions
counted (issue 16: videollm.py and videollm_online.py imported each other; the trainer and the
evaluation reached into each other)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from test_cli_import_graph import find_cycle

VREX = Path(__file__).resolve().parents[2] / "vrex"


def package_imports(root: Path, package: str) -> dict[str, set[str]]:
    """module name -> the modules of ``package`` (dotted, e.g. ``vrex.models``) it imports anywhere in its file."""
    names = {p.stem for p in root.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        deps = set()
        tree = ast.parse(path.read_text())
        for block in ast.walk(tree):  # imports only a type checker runs are no runtime cycle
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test):
                block.body = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level == 1:  # from .x import y / from . import x
                    module = f"{package}.{module}" if module else package
                if module.startswith(package + "."):
                    deps.add(module[len(package) + 1:].split(".")[0])
                elif module == package:
                    deps |= {a.name for a in node.names if a.name in names}
            elif isinstance(node, ast.Import):
                deps |= {a.name[len(package) + 1:].split(".")[0] for a in node.names if a.name.startswith(package + ".")}
        graph[path.stem] = (deps & names) - {path.stem, "__init__"}
    return graph


def test_package_imports_sees_relative_and_lazy_imports(tmp_path):
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from vrex.pkg import a\n")
    assert find_cycle(package_imports(tmp_path, "vrex.pkg")) == ["a", "b", "a"]
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vrex.pkg import d\n")
    (tmp_path / "d.py").write_text("from vrex.pkg import c\n")
    assert package_imports(tmp_path, "vrex.pkg")["c"] == set()  # a type-checking import is no runtime import


@pytest.mark.parametrize("package, modules, reader", [
    ("models", {"videollm", "videollm_online"}, "videollm"),
    ("train", {"evaluate", "trainer"}, "evaluate"),
    ("engine", {"session", "durable", "config"}, "session"),  # durable read SessionConfig from the session
])
def test_package_modules_import_without_cycles(package, modules, reader):
    graph = package_imports(VREX / package, f"vrex.{package}")
    assert modules <= set(graph) and graph[reader]  # the graph is read
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle in vrex/{package}: {' -> '.join(cycle)}"
