"""The HTTP + WebSocket API with the real default model on a real clip: create, stream, narrate,
ask, answer with its timeline, thumbnails, dropping when behind, close."""

from __future__ import annotations

import json

import httpx
import pytest
from serve_helpers import feed, stream, wait_for
from websockets.sync.client import connect


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_page_health_and_docs(client):
    assert client.get("/health").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and "What did it look at" in page.text
    spec = client.get("/openapi.json").json()
    assert "/api/sessions/{sid}/ask" in spec["paths"] and "/api/sessions/{sid}/answers/{aid}" in spec["paths"]


def test_stream_narrate_ask_timeline_close(client, jpegs):
    sid = client.post("/api/sessions", json={"policy": "full", "fps": 2}).json()["id"]
    feed(client, sid, jpegs[:4])
    events = wait_for(client, sid, lambda ev: sum(e["type"] == "frame" for e in ev) >= 2 and any(e["type"] == "response" for e in ev))
    narration = next(e for e in events if e["type"] == "response")
    assert narration["text"] and narration["timeline"]["kind"] == "response"
    answer = client.post(f"/api/sessions/{sid}/ask", json={"text": "What do you see?", "wait": True}).json()
    assert answer.get("type") == "answer" and answer["text"], answer
    assert answer["stats"]["answer_latency_ms"] > 0
    tl = answer["timeline"]
    processed = client.get(f"/api/sessions/{sid}").json()["frames"]
    assert len(tl["frames"]) == processed and tl["steps"] >= 2  # prompt step + decoded tokens
    # full reads every past token: every frame's share is 1.
    assert all(f["share"] == pytest.approx(1.0) for f in tl["frames"])
    detail = client.get(f"/api/sessions/{sid}/answers/{answer['id']}", params={"layers": True}).json()
    assert len(detail["layers"]) == 30 and len(detail["layers"][0]) == processed
    top = tl["top"][0]["frame"]
    thumb = client.get(f"/api/sessions/{sid}/frames/{top}/thumb")
    assert thumb.headers["content-type"] == "image/jpeg" and thumb.content[:2] == b"\xff\xd8"
    assert client.get(f"/api/sessions/{sid}/answers/nope").status_code == 404
    assert client.delete(f"/api/sessions/{sid}").json() == {"closed": sid}
    assert client.get(f"/api/sessions/{sid}").status_code == 404


def test_streamingllm_timeline_reads_only_recent_frames(client, jpegs):
    """StreamingLLM with a 30-token window (policy spec string): old frames read 0, the newest 1."""
    sid = client.post("/api/sessions", json={"policy": "streamingllm[window=30]", "fps": 2, "theta": 0, "recent_tokens": 0}).json()["id"]
    feed(client, sid, jpegs[:6])
    answer = client.post(f"/api/sessions/{sid}/ask", json={"text": "What is shown now?", "wait": True}).json()
    shares = [f["share"] for f in answer["timeline"]["frames"]]
    assert len(shares) >= 4 and shares[0] == 0.0 and shares[-1] == pytest.approx(1.0)
    assert answer["timeline"]["policy"] == "streamingllm[window=30]"
    client.delete(f"/api/sessions/{sid}")


def test_frames_faster_than_the_machine_are_dropped_and_counted(client, jpegs):
    sid = client.post("/api/sessions", json={"fps": 2, "theta": 0}).json()["id"]
    stream(client, sid, jpegs * 2)  # 40 frames posted at once: the worker cannot keep up
    info = wait_for(client, sid, lambda ev: any(e["type"] == "frame" for e in ev))
    state = client.get(f"/api/sessions/{sid}").json()
    c = state["counters"]
    assert c["received"] == 40 and c["dropped_behind"] > 0
    assert c["processed"] + c["dropped_behind"] + c["dropped_rate"] <= 40
    # Frames too close in time (above the session's fps) are dropped by rate.
    r = client.post(f"/api/sessions/{sid}/frames", params={"t": 19.6}, content=jpegs[0]).json()
    assert r["accepted"] is False and r["dropped_rate"] == 1
    assert info
    client.delete(f"/api/sessions/{sid}")


def test_websocket_frames_and_questions(server, client, jpegs):
    sid = client.post("/api/sessions", json={"fps": 4}).json()["id"]
    with connect(f"ws://127.0.0.1:{server.port}/api/sessions/{sid}/ws") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        for f in jpegs[:3]:
            ws.send(f)
        ws.send(json.dumps({"type": "ask", "text": "What do you see?"}))
        seen = []
        while not any(m["type"] == "answer" for m in seen):
            seen.append(json.loads(ws.recv(timeout=60)))
    kinds = [m["type"] for m in seen]
    assert "frame" in kinds and "question" in kinds
    answer = next(m for m in seen if m["type"] == "answer")
    assert answer["text"] and answer["timeline"]["frames"]
    client.delete(f"/api/sessions/{sid}")


def test_server_side_media_and_browser_upload_play_in_real_time(client, clip_path):
    names = client.get("/api/config").json()["media"]
    assert "cockatoo.mp4" in names
    sid = client.post("/api/sessions", json={"fps": 2, "theta": 0}).json()["id"]
    assert client.post(f"/api/sessions/{sid}/source", json={"media": "../videos/../../etc/passwd"}).status_code == 404
    r = client.post(f"/api/sessions/{sid}/source", json={"media": "cockatoo.mp4"})
    assert r.status_code == 200 and r.json()["source"]["state"] == "playing"
    wait_for(client, sid, lambda ev: sum(e["type"] == "frame" for e in ev) >= 2)
    assert client.delete(f"/api/sessions/{sid}/source").json() == {"stopped": True}
    # The same clip uploaded as a browser would (raw body): replaces the running source.
    r = client.post(f"/api/sessions/{sid}/upload", params={"name": "cockatoo.mp4"}, content=clip_path.read_bytes())
    assert r.status_code == 200 and r.json()["bytes"] == clip_path.stat().st_size
    before = client.get(f"/api/sessions/{sid}").json()["frames"]
    wait_for(client, sid, lambda ev: sum(e["type"] == "frame" for e in ev) >= before + 2)
    state = client.get(f"/api/sessions/{sid}").json()
    assert state["source"]["label"] == "upload cockatoo.mp4" and state["source"]["frames"] >= 2
    client.delete(f"/api/sessions/{sid}")
