"""The CI rule of tests/conftest.py, run on a tiny inner suite: under CI=true a skip for a missing
asset or weight fails; other skips stay skips, and without CI both skip (issue 16: a runner with no
media stayed green)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

INNER = '''
import pytest

def test_needs_media():
    pytest.skip("shared test media not found (set VREX_ASSETS to the assets folder)")

def test_needs_weights():
    pytest.skip("the shipped weights are missing (run make setup)")

def test_needs_an_extra():
    pytest.skip("the serve extra is not installed")
'''


def run_inner(tmp_path: Path, ci: str | None) -> str:
    shutil.copy(Path(__file__).parent / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(INNER)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-p", "no:xdist",
                          str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return out.stdout


@pytest.mark.parametrize("ci, failed, skipped", [("true", 2, 1), (None, 0, 3), ("false", 0, 3)])
def test_missing_asset_fails_only_under_ci(tmp_path, ci, failed, skipped):
    out = run_inner(tmp_path, ci)
    summary = out.strip().splitlines()[-1]
    assert (f"{failed} failed" in summary) == bool(failed) and f"{skipped} skipped" in summary, out
    if failed:
        assert "FAILED test_inner.py::test_needs_media" in out and "FAILED test_inner.py::test_needs_weights" in out, out
        assert "CI=true: a missing asset or weight fails the run" in out
