"""`vrex bench streams` (issue 20) on the real model at a tiny size: the rows outside checks read, both
modes, and the LM weights type reaching the separate processes (they load the model themselves)."""

from __future__ import annotations

import json

import psutil

REQUIRED = {"streams", "mode", "policy", "cached_tokens", "aggregate_fps", "p99_frame_ms"}


def test_streams_bench_tiny_run_in_bfloat16(tmp_path):
    """Through the command outside checks use (`vrex bench streams ... --out DIR`), at a tiny size."""
    from typer.testing import CliRunner

    from vrex.cli import app

    result = CliRunner().invoke(app, ["bench", "streams", "--counts", "2", "--sizes", "64", "--modes", "batched,separate",
                                      "--policies", "full", "--frames", "2", "--lm-dtype", "bfloat16", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "streams.json").read_text())
    assert len(rows) == 2
    assert all(REQUIRED <= set(r) for r in rows)
    by = {r["mode"]: r for r in rows}
    for r in rows:
        assert r["lm_dtype"] == "bfloat16" and r["streams"] == 2 and r["aggregate_fps"] > 0
        assert r["p99_frame_ms"] >= r["p50_frame_ms"] > 0
    assert by["separate"]["threads"] == max(1, (psutil.cpu_count(logical=True) or 1) // 2)
    assert by["separate"]["cached_tokens_end"] == by["batched"]["cached_tokens_end"]  # the same frames in both
    assert (tmp_path / "streams.png").stat().st_size > 0
