"""Batched streams (vrex.engine.batch): each stream computes what it computes alone.

Real model (untrained connector), real photos. Streams of different lengths join and leave, one
speaks after every frame (decode steps), one never does (so their frame steps differ in length
and run apart), questions are asked to two streams at once.
"""

from __future__ import annotations

import threading

import pytest
import torch

from vrex.engine.batch import BatchEngine, StreamStepError
from vrex.engine.session import SessionConfig, StreamingSession
from vrex.kv.policies import make_policy

# theta 1.0: always speak (the gate's P(interval) < 1); 0.0: never.
STREAMS = {
    "a": ("full", 1.0, 0, 5),    # (policy, theta, first step, steps)
    "b": ("resv", 0.0, 0, 6),
    "c": ("resv", 1.0, 1, 3),
    "d": ("full", 0.0, 2, 4),
}


def _config(theta: float) -> SessionConfig:
    return SessionConfig(theta=theta, max_response_tokens=3, max_answer_tokens=4)


def _frames(photos, sid: str, n: int):
    k = ord(sid) - ord("a")
    return [(0.5 * i, photos[(k + i) % len(photos)]) for i in range(n)]


def _summary(events) -> list:
    return [(e.kind, e.text, e.stats.get("cached_tokens")) for e in events]


def _p(events) -> list[float]:
    return [e.stats["p_interval"] for e in events if e.kind == "frame"]


def _alone(videollm, photos, sid: str):
    policy, theta, _, n = STREAMS[sid]
    s = StreamingSession(videollm, make_policy(policy), _config(theta))
    events = []
    for t, image in _frames(photos, sid, n):
        events += s.push_frame(t, image)
    events += s.ask("What do you see?")
    return events


def test_batched_streams_equal_alone(videollm, photos):
    grad_before = torch.is_grad_enabled()
    engine = BatchEngine(videollm)
    got: dict[str, list] = {sid: [] for sid in STREAMS}
    frames = {sid: _frames(photos, sid, n) for sid, (_, _, _, n) in STREAMS.items()}
    step = 0
    while any(got_n < STREAMS[sid][3] for sid, got_n in ((s, sum(e.kind == "frame" for e in got[s])) for s in STREAMS)):
        for sid, (policy, theta, first, n) in STREAMS.items():
            if step == first:
                engine.add_stream(sid, make_policy(policy), _config(theta))
        due = {sid: frames[sid][step - STREAMS[sid][2]] for sid in engine.streams
               if step - STREAMS[sid][2] < STREAMS[sid][3]}
        for sid, events in engine.step(due).items():
            got[sid] += events
        # a stream that has sent its last frame answers (two at once when they finish together) and leaves
        finished = [sid for sid in list(engine.streams) if step - STREAMS[sid][2] == STREAMS[sid][3] - 1]
        if finished:
            for sid, events in engine.ask({sid: "What do you see?" for sid in finished}).items():
                got[sid] += events
            for sid in finished:
                engine.remove_stream(sid)
        step += 1
    assert engine.counters["lm_rows"] > engine.counters["lm_forwards"], "no LM step was batched"
    assert engine.counters["encode_images"] > engine.counters["encode_batches"], "no encoder batch"
    assert torch.is_grad_enabled() == grad_before  # the engine's no-grad step restores the caller's mode
    for sid in STREAMS:
        ref = _alone(videollm, photos, sid)
        assert [e.stats.get("stream") for e in got[sid] if e.kind == "frame"] == [sid] * STREAMS[sid][3]
        assert _summary(got[sid]) == _summary(ref), sid
        assert _p(got[sid]) == pytest.approx(_p(ref), abs=1e-4), sid
    assert any(e.kind == "response" and e.text for e in got["a"])  # decode steps ran
    assert not any(e.kind == "response" for e in got["b"])


def test_shared_device_budget(videollm, photos):
    share_tokens = 40  # per stream, every layer: a few frames, so older ones spill to host
    cfg = videollm.lm.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    token_bytes = 2 * head_dim * cfg.num_key_value_heads * cfg.num_hidden_layers * 4
    engine = BatchEngine(videollm, device_budget_bytes=2 * share_tokens * token_bytes, max_streams=2)
    for sid, policy in (("x", "resv"), ("y", "full")):
        engine.add_stream(sid, make_policy(policy), _config(0.0))
    for i in range(6):
        out = engine.step({"x": (0.5 * i, photos[i % 7]), "y": (0.5 * i, photos[(i + 3) % 7])})
    mem = engine.memory()
    assert mem["device_share_bytes"] == share_tokens * token_bytes
    for sid in ("x", "y"):
        per = mem["streams"][sid]
        assert 0 < per["device_bytes"] <= mem["device_share_bytes"]
        assert per["host_bytes"] > 0  # the rest of the stream went to the host tier
        assert out[sid][0].stats["device_share_bytes"] == mem["device_share_bytes"]
    assert mem["total"]["device_bytes"] == sum(mem["streams"][s]["device_bytes"] for s in ("x", "y"))
    with pytest.raises(ValueError, match="at most 2 streams"):
        engine.add_stream("z", make_policy("full"))


def test_device_budget_split_again_when_streams_join_and_leave(videollm, photos):
    """The shared budget is split over the live streams: a third stream joining shrinks the others'
    device tiers at once (their oldest blocks go to the host, counted as offloads), its leaving gives
    the room back, and later frames use it."""
    share_tokens = 40
    cfg = videollm.lm.config
    token_bytes = 2 * (cfg.hidden_size // cfg.num_attention_heads) * cfg.num_key_value_heads * cfg.num_hidden_layers * 4
    budget = 2 * share_tokens * token_bytes
    engine = BatchEngine(videollm, device_budget_bytes=budget, max_streams=3)
    for sid in ("x", "y"):
        engine.add_stream(sid, make_policy("resv"), _config(0.0))
    for i in range(5):
        engine.step({"x": (0.5 * i, photos[i % 7]), "y": (0.5 * i, photos[(i + 3) % 7])})
    before = engine.memory()["streams"]["x"]
    offloaded = engine.streams["x"].store.counters()["offload_device_host_bytes"]
    assert before["device_bytes"] > budget // 3  # it uses more than a third of the budget
    engine.add_stream("z", make_policy("resv"), _config(0.0))
    mem = engine.memory()
    assert mem["device_share_bytes"] == budget // 3
    for sid in ("x", "y", "z"):
        assert mem["streams"][sid]["device_bytes"] <= budget // 3
    x = mem["streams"]["x"]
    assert x["kv_bytes"] == before["kv_bytes"] and x["host_bytes"] > before["host_bytes"]
    assert engine.streams["x"].store.counters()["offload_device_host_bytes"] > offloaded
    out = engine.step({"x": (2.5, photos[5]), "y": (2.5, photos[1]), "z": (0.0, photos[2])})
    assert out["x"][0].stats["device_share_bytes"] == budget // 3
    engine.remove_stream("z")
    assert engine.device_share_bytes == budget // 2
    for i in range(6, 9):
        engine.step({"x": (0.5 * i, photos[i % 7]), "y": (0.5 * i, photos[(i + 3) % 7])})
    assert budget // 3 < engine.memory()["streams"]["x"]["device_bytes"] <= budget // 2


def test_failing_stream_does_not_stop_others(videollm, photos):
    engine = BatchEngine(videollm)
    engine.add_stream("ok", make_policy("full"), _config(0.0))
    engine.add_stream("bad", make_policy("full"), _config(0.0))
    engine.step({"ok": (1.0, photos[0]), "bad": (1.0, photos[1])})
    with pytest.raises(StreamStepError) as info:
        engine.step({"ok": (2.0, photos[2]), "bad": (0.5, photos[3])})  # time goes backwards
    assert set(info.value.errors) == {"bad"} and "before the previous frame" in str(info.value)
    assert info.value.results["ok"][0].stats["frame"] == 1


def test_stalled_source_does_not_hold_others(videollm, photos):
    engine = BatchEngine(videollm)
    for sid in ("live", "stalled"):
        engine.add_stream(sid, make_policy("full"), _config(0.0))
    release = threading.Event()

    def stalled():
        yield 0.0, photos[0]
        release.wait(60)
        yield 0.5, photos[1]

    order = []
    for sid, event in engine.run_sources({"live": _frames(photos, "a", 4), "stalled": stalled()}):
        if event.kind == "frame":
            order.append(sid)
            if order.count("live") == 4:
                release.set()
    # every live frame was stepped while the other source was stalled on its second frame
    assert order.count("live") == 4 and order.count("stalled") == 2
    assert order.index("live") < len(order) - 1 and order[-1] == "stalled"
