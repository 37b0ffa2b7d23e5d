"""`vrex bench stream` on the real model at tiny sizes: the rows outside checks read, fidelity that
can tell a policy that forgets from one that does not, and the CLI's refusal of bad specs."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from vrex.bench.stream import run_stream_bench
from vrex.cli import app

REQUIRED = {"policy", "cached_tokens", "frame_ms", "token_ms", "vision_ms", "top1_agreement", "kl", "resident_bytes"}


def test_stream_bench_tiny_run(tmp_path):
    rows = run_stream_bench([160, 320], ["full", "resv", "streamingllm[window=13,sink=0]"], frames=1, tokens=2,
                            out=tmp_path, log=lambda line: None)
    stored = json.loads((tmp_path / "stream.json").read_text())
    assert stored == json.loads(json.dumps(rows)) and len(rows) == 6
    assert all(REQUIRED <= set(r) for r in stored)
    for r in rows:  # one frame per row: its step is its vision plus its LM prefill, each measured
        assert r["vision_ms"] > 0 and r["prefill_ms"] > 0
        assert abs(r["frame_ms"] - r["vision_ms"] - r["prefill_ms"]) < 1e-6
    assert (tmp_path / "stream.png").stat().st_size > 0
    by = {(r["policy"].split("[")[0], r["target_tokens"]): r for r in rows}
    for size in (160, 320):
        full, resv, sllm = by[("full", size)], by[("resv", size)], by[("streamingllm", size)]
        assert full["positions"] >= 300 and full["cached_tokens"] >= size - 13
        assert full["top1_agreement"] == 1.0 and full["kl"] < 1e-6  # a fork of full reproduces full exactly
        # a 13-token window forgets almost everything: further from full than ReSV's selection
        assert sllm["kl"] > resv["kl"]
        assert sllm["resident_bytes"] < full["resident_bytes"]
        # shares of the past read: everything for full; a 13-token window reads less than ReSV
        assert full["frame_selected_ratio"] == full["token_selected_ratio"] == 1.0
        assert 0 < sllm["token_selected_ratio"] < resv["token_selected_ratio"] <= 1.0
        assert 0 < sllm["frame_selected_ratio"] < resv["frame_selected_ratio"] <= 1.0


def test_stream_bench_refuses_bad_spec_before_loading():
    result = CliRunner().invoke(app, ["bench", "stream", "--policies", "resv[nonsense=1]"])
    assert result.exit_code == 2 and "nonsense" in result.output


def test_stream_bench_measures_forks_in_the_kv_type_asked(tmp_path):
    """--kv-dtype: the measured forks store K/V in that type (half the resident bytes in bfloat16), and
    the row says which."""
    rows = {dt: run_stream_bench([160], ["full"], frames=1, tokens=2, out=tmp_path / dt, kv_dtype=dt,
                                 log=lambda line: None)[0] for dt in ("float32", "bfloat16")}
    assert rows["float32"]["kv_dtype"] == "float32" and rows["bfloat16"]["kv_dtype"] == "bfloat16"
    assert rows["bfloat16"]["resident_bytes"] * 2 == rows["float32"]["resident_bytes"]


def test_stream_bench_refuses_a_bad_kv_dtype():
    result = CliRunner().invoke(app, ["bench", "stream", "--kv-dtype", "int8"])
    assert result.exit_code != 0 and "--kv-dtype 'int8'" in result.output
