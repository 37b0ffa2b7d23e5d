"""vrex.bench.runlog (`vrex report`): minute rows, deadline counts and busy shares follow the events;
a file that is not a `vrex run --json` log is refused by name and line. A real run's log is checked
end to end in tests/engine/test_cli.py (test_run_real_clip_with_question_json)."""

from __future__ import annotations

import json

import pytest

from vrex.bench.runlog import RunLogError, percentile, read_events, summarize, table

MIB = 2**20


def _frame(t: float, ms: float, rss_mib: int, tokens: int, reindex_ms: float = 0.0) -> dict:
    return {"t": t, "kind": "frame", "text": "", "stats": {"total_ms": ms, "reindex_ms": reindex_ms, "cached_tokens": tokens,
                                                           "rss_bytes": rss_mib * MIB, "device_bytes": 64 * MIB, "host_bytes": 0,
                                                           "disk_bytes": 0}}


def _events() -> list[dict]:
    ev = [{"kind": "start", "policy": "resv", "source": "clips/", "model": "m", "fps": 2.0}]
    # minute 1: 0 .. 59.5 s, minute 2: 60 .. 119.5 s, minute 3: 120 s only
    for i in range(241):
        t = 0.5 * i
        spike = 600.0 if i in (5, 130) else 0.0  # two frames that re-indexed positions
        ev.append(_frame(t, 100.0 + spike + i % 7, 1000 + i // 120, 13 * (i + 1), reindex_ms=spike - 50.0 * (i == 5)))
    ev.insert(40, {"t": 19.5, "kind": "response", "text": "A bird.", "stats": {"prompt_ms": 80.0, "token_ms": [40.0, 40.0]}})
    ev.append({"t": 120.0, "kind": "answer", "text": "A cat.",
               "stats": {"question": "What?", "prompt_ms": 200.0, "token_ms": [50.0] * 4}})
    ev.append({"kind": "source_end", "status": "stopped", "reason": "max_frames=241 reached", "frames": 241, "warnings": {}})
    return ev


def test_minutes_deadline_and_busy_share_follow_the_events():
    ev = _events()
    s = summarize(ev, deadline_ms=500.0)
    frames = [e for e in ev if e["kind"] == "frame"]
    assert (s["name"], s["frames"], s["frames_over_deadline"], s["narrations"]) == ("resv", 241, 2, 1)
    assert [r["minute"] for r in s["per_minute"]] == [1, 2, 3]
    assert [r["frames"] for r in s["per_minute"]] == [120, 120, 1]
    assert [r["frames_over_deadline"] for r in s["per_minute"]] == [1, 1, 0]
    first = [f["stats"]["total_ms"] for f in frames[:120]]
    assert s["per_minute"][0]["busy_share"] == pytest.approx((sum(first) + 160.0) / 60000, abs=1e-3)
    # the last minute has one frame: its share is over the half second that frame covers
    assert s["per_minute"][2]["busy_share"] == pytest.approx((frames[-1]["stats"]["total_ms"] + 400.0) / 500, abs=1e-3)
    no_fps = summarize(ev[1:])  # without a start event: over whole minutes
    assert no_fps["per_minute"][2]["busy_share"] == pytest.approx((frames[-1]["stats"]["total_ms"] + 400.0) / 60000, abs=1e-3)
    assert [r["rss_mib"] for r in s["per_minute"]] == [1000, 1001, 1002] and s["rss_max_mib"] == 1002
    assert [r["cached_tokens"] for r in s["per_minute"]] == [13 * 120, 13 * 240, 13 * 241]
    assert s["max_frame_ms"] == round(max(f["stats"]["total_ms"] for f in frames), 1)
    assert s["answers"] == [{"t": 120.0, "question": "What?", "text": "A cat."}]
    assert s["end"]["reason"] == "max_frames=241 reached"
    assert (s["reindex_frames"], s["p50_reindex_ms"], s["max_reindex_ms"]) == (2, 575.0, 600.0)
    assert [r["reindex_frames"] for r in s["per_minute"]] == [1, 1, 0] and s["per_minute"][0]["max_reindex_ms"] == 550.0
    # a stricter deadline counts more frames; a name replaces the policy
    assert summarize(ev, deadline_ms=105.0, name="tuned")["frames_over_deadline"] > 2
    text = table([s, summarize(ev, name="again")], every=2)
    assert "| 2, 575.0 / 600.0 |" in text
    assert "| resv | 241 |" in text and "| again | 3 |" in text and "| again | 2 |" not in text  # minute 2 skipped, the last kept


def test_percentile_is_a_value_that_occurred():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.99) == 99.0 and percentile(values, 0.5) in values and percentile([7.0], 0.99) == 7.0


@pytest.mark.parametrize("text, what", [
    ("not json\n", "line 1: not JSON"),
    ('{"kind": "start"}\n[1, 2]\n', "line 2: not a vrex event"),
    ('{"kind": "start"}\n', "no frame events"),
])
def test_a_file_that_is_not_a_run_log_is_named(tmp_path, text, what):
    path = tmp_path / "log.jsonl"
    path.write_text(text)
    with pytest.raises(RunLogError, match=f"{path}.*{what}"):
        read_events(path)
    ok = tmp_path / "ok.jsonl"
    ok.write_text("\n".join(json.dumps(e) for e in _events()) + "\n\n")
    assert len(read_events(ok)) == len(_events())
