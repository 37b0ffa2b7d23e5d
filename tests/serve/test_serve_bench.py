"""`vrex bench serve`'s measurement on a short real run: two webcam-like clients against the test server."""

from __future__ import annotations

from vrex.serve.bench import clip_frames, format_table, plot, run_config


def test_two_clients_counted_and_answered(server, tmp_path):
    frames = [clip_frames(name, 2.0, 3.0) for name in ("videos/cockatoo.mp4", "videos/chaplin.mp4")]
    row = run_config(server, 2, frames, fps=2.0, seconds=3.0, policy="full")
    assert row["sessions"] == 2 and 10 <= row["sent"] <= 14  # 2 clients x 3 s x 2 fps (+1 at t=0 each)
    processed = sum(s["processed"] for s in row["per_session"])
    assert processed >= 2 and processed + sum(s["dropped"] for s in row["per_session"]) <= row["sent"]
    counts = [s["processed"] for s in row["per_session"]]
    assert max(counts) - min(counts) <= 2  # least-recently-served scheduling: equal shares
    assert 0 < row["latency_p50_ms"] <= row["latency_p99_ms"]
    assert row["answer_ms_p50"] > 0 and all(row["answers"])
    result = {"rows": [row], "machine": {"threads": 1}}
    assert "| 2 |" in format_table(result)
    plot(result, tmp_path / "serve.png")
    assert (tmp_path / "serve.png").stat().st_size > 5000
