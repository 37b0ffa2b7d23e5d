"""`vrex hw simulate --trace` on real ReSV telemetry written by a short `vrex run` (SmolLM2, a real clip)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vrex.cli.hw import app
from vrex.hw.stats import load_trace
from vrex.io import assets_dir

FRAMES = 6


@pytest.fixture(scope="module")
def real_trace(tmp_path_factory) -> Path:
    root = assets_dir()
    if root is None:
        if os.environ.get("CI") == "true":
            pytest.fail("shared media not found under CI (set VREX_ASSETS)")
        pytest.skip("shared media not found (set VREX_ASSETS)")
    out = tmp_path_factory.mktemp("trace") / "kv.jsonl"
    exe = Path(sys.executable).parent / "vrex"
    cmd = [str(exe), "run", str(Path(root) / "videos" / "cockatoo.mp4"), "--policy", "resv",
           "--max-frames", str(FRAMES), "--trace", str(out), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def test_trace_has_resv_records(real_trace):
    recs = [json.loads(x) for x in real_trace.read_text().splitlines() if x.strip()]
    frames = [r for r in recs if r["stage"] == "frame"]
    assert len(frames) >= FRAMES - 1 and all(r["schema"] == "vrex.kv.step/1" for r in recs)
    s = load_trace(real_trace)
    assert s.source == "trace" and 0 < s.frame_ratio <= 1 and s.ref_kv > 0 and s.cluster_size >= 1


def test_simulate_runs_on_the_real_trace(real_trace, tmp_path):
    res = CliRunner().invoke(app, ["simulate", "--system", "vrex8", "--kv", "1k,10k,40k", "--trace", str(real_trace),
                                   "--out", str(tmp_path), "--no-baselines"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "simulate.json").read_text())
    assert doc["stats"]["source"] == "trace" and doc["stats"]["frame_ratio"] == pytest.approx(load_trace(real_trace).frame_ratio)
    steps = doc["systems"]["vrex8"]["steps"]
    assert [s["frame"]["kv_tokens"] for s in steps] == [1000, 10000, 40000]
    assert all(s["frame"]["latency_s"] > 0 and s["frame"]["extra"]["wtu_cycles"] > 0 for s in steps)
    assert "trace" in res.output
