"""No help string of vrex/cli quotes a measurement (a duration, a speed-up, a rate): such numbers go
stale with the next optimisation and belong in the README and docs (issue 16)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

CLI = Path(__file__).resolve().parents[2] / "vrex" / "cli"
# a duration something took (approximate: "about 10 minutes", "~20 s"), a latency, a rate or a speed-up;
# lengths of streams the user asks for ("needles at 1 and 2 minutes") are settings, not measurements
MEASURED = re.compile(r"(about|~|roughly|takes|took)\s*\d+(\.\d+)?\s?(ms|s|sec|seconds?|minutes?|mins?|hours?|h)\b"
                      r"|\d+(\.\d+)?\s?(ms|us|µs|tok/s|frames/s|GB/s|MB/s)(?![\w/])|\d+(\.\d+)?\s?x (faster|slower)")


def help_texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every ``help=`` string and every command docstring in one CLI module."""
    out = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "help":
            parts = [n.value for n in ast.walk(node.value) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            out.append((node.value.lineno, "".join(parts)))
        elif isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr in ("command", "callback")
                for d in node.decorator_list):
            if (doc := ast.get_docstring(node)) is not None:
                out.append((node.lineno, doc))
    return out


def test_pattern_sees_measurements():
    for text in ("full (about 10 minutes)", "takes 12 ms per frame", "3.4x faster than full", "~0.5 s per token", "9 tok/s"):
        assert MEASURED.search(text), text
    for text in ("Default 1,2,4,8.", "Frames per second (2 fps).", "Cached tokens (k = 1024).", "e.g. 512MB, 2GiB",
                 "needles at 1 and 2 minutes only", "one stream (~400 tokens)", "600 = 5 min at 2 FPS"):
        assert not MEASURED.search(text), text


def test_no_help_string_quotes_a_measurement():
    found = [f"{p.name}:{line}: {m.group(0)!r} in {text[:80]!r}"
             for p in sorted(CLI.glob("*.py")) for line, text in help_texts(p) if (m := MEASURED.search(text))]
    assert not found, "help strings quoting measured numbers:\n" + "\n".join(found)
    assert sum(len(help_texts(p)) for p in CLI.glob("*.py")) > 50  # the help strings were read
