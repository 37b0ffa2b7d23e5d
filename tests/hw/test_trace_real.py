"""`vrex hw simulate --trace` on real ReSV telemetry: a committed trace (never skipped) and one written by
a short live `vrex run` (SmolLM2, a real clip)."""

from __future__ import annotations

import gzip
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
#: `vrex run ../shared/assets/videos/vtest_pedestrians.avi --policy resv --max-frames 60
#:  --ask "25:What are the people doing?" --trace kv.jsonl` (SmolLM2-135M + EfficientNet-Lite0, 2 fps), gzipped
COMMITTED = Path(__file__).parent / "data" / "vtest_pedestrians_resv_60f.jsonl.gz"


def _records(path: Path) -> list[dict]:
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def test_committed_trace_is_small_real_telemetry_and_loads_as_it_says():
    assert COMMITTED.stat().st_size < 300_000
    recs = _records(COMMITTED)
    assert all(r["schema"] == "vrex.kv.step/1" for r in recs)
    frames = [r for r in recs if r["stage"] == "frame"]
    # text prefills and decoded tokens with a policy choice (the first prefill, the system prompt, has none)
    text = [r for r in recs if r["stage"] in ("text", "decode") and r["summary"]["policy_selected_ratio"] is not None]
    assert len(frames) == 60 and text
    s = load_trace(COMMITTED)
    # the statistics are the file's own numbers, recomputed here from the raw records
    want = sum(r["summary"]["policy_selected_ratio"] for r in frames) / len(frames)
    assert s.frame_ratio == pytest.approx(want, rel=1e-12) and 0.3 < s.frame_ratio < 1
    assert s.text_ratio == pytest.approx(sum(r["summary"]["policy_selected_ratio"] for r in text) / len(text), rel=1e-12)
    past = [r["layers"][0]["n_past"] for r in frames]
    assert s.frame_past_range == (min(past), max(past))
    # 48-853 past tokens: a 17x and 805-token span, so the trace measures its own growth exponent
    assert max(past) / min(past) >= 4 and max(past) - min(past) >= 500
    assert s.growth_exponent is not None and 0.5 < s.growth_exponent < 1.2


def test_a_short_trace_keeps_the_default_growth_exponent(tmp_path):
    """Six frames (a few hundred past tokens) measure the policy's warm-up, not its growth law."""
    recs = _records(COMMITTED)
    short = [r for r in recs if r["stage"] == "frame"][:6]
    path = tmp_path / "short.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in short))
    s = load_trace(path)
    assert s.growth_exponent is None and s.frame_past_range is not None and s.frame_past_range[1] < 500
    res = CliRunner().invoke(app, ["simulate", "--system", "vrex8", "--kv", "1k", "--trace", str(path),
                                   "--out", str(tmp_path), "--no-baselines"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "default 0.7 kept" in " ".join(res.output.split())


def test_simulate_runs_on_the_committed_trace(tmp_path):
    res = CliRunner().invoke(app, ["simulate", "--system", "vrex8", "--kv", "1k,10k,40k", "--trace", str(COMMITTED),
                                   "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "measured" in " ".join(res.output.split())
    doc = json.loads((tmp_path / "simulate.json").read_text())
    s = load_trace(COMMITTED)
    assert doc["stats"]["source"] == "trace" and doc["stats"]["frame_ratio"] == pytest.approx(s.frame_ratio)
    vx = [st["frame"] for st in doc["systems"]["vrex8"]["steps"]]
    fg = [st["frame"] for st in doc["systems"]["agx+flexgen"]["steps"]]
    lat = [f["latency_s"] for f in vx]
    assert lat[0] < lat[1] < lat[2]  # V-Rex8's frame latency grows with the KV
    assert all(f["extra"]["wtu_cycles"] > 0 and f["link_bytes"] > 0 for f in vx)
    # the trace's ratios drive V-Rex8 (not the paper's): at the trace's own KV size the selected share
    # is the trace's frame ratio; FlexGen reads everything whatever the trace says
    assert vx[0]["selected_ratio"] == pytest.approx(
        min(1.0, s.frame_ratio * (1000 / s.ref_kv) ** (s.growth_exponent - 1)), rel=1e-9)
    assert all(f["selected_ratio"] == 1.0 for f in fg) and all(a["latency_s"] > b["latency_s"] for a, b in zip(fg, vx))


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
