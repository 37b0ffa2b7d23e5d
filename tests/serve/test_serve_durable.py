"""``vrex serve --sessions-dir``: a served stream saved as it goes survives a kill -9 of the server.

The real default model on a real clip: a ``vrex serve`` subprocess streams frames and is killed
(SIGKILL) while it steps one; a server restarted on the same directory resumes the session by id,
and the events after the resume equal those of a server that was never interrupted (greedy).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import comparable, feed, start, wait_for

from vrex.engine.session import StreamingSession
from vrex.kv.policies import make_policy

VREX = [sys.executable, "-m", "vrex.cli"]
SETTINGS = {"policy": "resv", "fps": 2, "theta": 1.0}  # theta 1: it narrates after (almost) every frame
FRAMES = 6
QUESTION = "What do you see?"


def _after(events: list[dict], frame_t: float) -> list[dict]:
    return [e for e in events if e["type"] in ("frame", "response", "answer") and e["t"] > frame_t - 1e-9]


def _uninterrupted(model, jpegs) -> list[dict]:
    server = start(model)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            sid = c.post("/api/sessions", json=SETTINGS).json()["id"]
            feed(c, sid, jpegs[:FRAMES])
            c.post(f"/api/sessions/{sid}/ask", json={"text": QUESTION, "wait": True})
            return wait_for(c, sid, lambda ev: any(e["type"] == "answer" for e in ev))
    finally:
        server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(port: int, sessions: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*VREX, "serve", "--port", str(port), "--threads", "1", "--sessions-dir", str(sessions)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except httpx.TransportError:
            assert time.monotonic() < deadline, "vrex serve did not come up"
            time.sleep(0.2)


def test_served_session_resumes_after_kill_9(model, jpegs, tmp_path):
    sessions = tmp_path / "sessions"
    port = _free_port()
    proc = _serve(port, sessions)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            assert c.get("/api/config").json()["saves_sessions"] is True
            sid = c.post("/api/sessions", json=SETTINGS).json()["id"]
            feed(c, sid, jpegs[:3])
            before = c.get(f"/api/sessions/{sid}/events").json()
            assert c.post(f"/api/sessions/{sid}/frames", params={"t": 1.5}, content=jpegs[3]).json()["accepted"]
            time.sleep(0.05)  # the worker is stepping frame 3: kill it there
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert (sessions / sid / "manifest.json").exists()

    server = start(model, sessions_dir=sessions)  # the same directory, a new server
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            listed = c.get("/api/sessions", params={"saved": True}).json()
            assert [(s["id"], s["state"]) for s in listed] == [(sid, "saved")]
            r = c.post(f"/api/sessions/{sid}/resume").json()
            k, t = r["resumed"]["frame"], r["resumed"]["t"]
            assert k in (3, 4) and t == pytest.approx(0.5 * (k - 1)) and r["state"] == "live"
            resumed = c.get(f"/api/sessions/{sid}/events").json()
            assert resumed[0]["type"] == "resume" and resumed[0]["frame"] == k
            assert resumed[0]["seq"] > max(e["seq"] for e in before)  # a client polling after=N misses nothing
            # What was said before the kill comes back for a page that reattaches (its reads were not saved).
            past = c.get(f"/api/sessions/{sid}/history").json()
            assert past["seq"] >= resumed[0]["seq"] and past["session"]["resumed"]["frame"] == k
            said = [(e["t"], e["text"]) for e in before if e["type"] == "response"]
            assert said and [(i["t"], i["text"]) for i in past["items"] if i["t"] < 1.5] == said
            assert not any(i["read_kept"] for i in past["items"])
            feed(c, sid, jpegs[k:FRAMES], t0=0.5 * k)
            answer = c.post(f"/api/sessions/{sid}/ask", json={"text": QUESTION, "wait": True}).json()
            events = wait_for(c, sid, lambda ev: any(e["type"] == "answer" for e in ev), after=resumed[0]["seq"])
            # The timeline and thumbnails cover the frames from before the kill too.
            assert [f["t"] for f in answer["timeline"]["frames"]] == [0.5 * i for i in range(FRAMES)]
            assert c.get(f"/api/sessions/{sid}/frames/0/thumb").content[:2] == b"\xff\xd8"
            state = c.get(f"/api/sessions/{sid}").json()
            assert state["frames"] == FRAMES and state["saved_frames"] == FRAMES
    finally:
        server.stop()

    reference = _uninterrupted(model, jpegs)
    assert any(e["type"] == "response" for e in reference), "the reference run should narrate"
    got, want = comparable(_after(events, 0.5 * k)), comparable(_after(reference, 0.5 * k))
    assert got == want and len(got) >= FRAMES - k + 1
    # Narrations before the kill are in the resumed session's dialogue too (what the answer attended to).
    manifest = json.loads((sessions / sid / "manifest.json").read_text())
    assert manifest["frames"] == FRAMES


def test_resume_routes_and_errors(model, jpegs, tmp_path):
    """Auto-resume on any request naming a saved id, DELETE removes the directory, clear errors."""
    sessions = tmp_path / "sessions"
    server = start(model, sessions_dir=sessions)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            sid = c.post("/api/sessions", json={"policy": "full", "theta": 0}).json()["id"]
            other = c.post("/api/sessions", json={"policy": "full", "theta": 0}).json()["id"]
            feed(c, sid, jpegs[:2])
    finally:
        server.stop()
    checkpoint = sessions / other / "checkpoint.bin"
    data = bytearray(checkpoint.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte: the checksum catches it
    checkpoint.write_bytes(bytes(data))
    foreign = "abcdefabcdef"  # a session saved by Python (as vrex run --session does), not by the server
    StreamingSession(model, make_policy("full")).save(sessions / foreign, {"source": "cam"})
    server = start(model, sessions_dir=sessions)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            assert c.get("/api/sessions").json() == []  # nothing loaded until a client names it
            state = c.get(f"/api/sessions/{sid}").json()  # a reconnecting client: resumed on the way
            assert state["state"] == "live" and state["frames"] == 2 and state["resumed"]["frame"] == 2
            feed(c, sid, jpegs[2:3], t0=1.0)
            assert c.get(f"/api/sessions/{sid}").json()["saved_frames"] == 3
            bad = c.post(f"/api/sessions/{other}/resume")
            assert bad.status_code == 409 and other in bad.json()["error"] and "checksum" in bad.json()["error"]
            bad = c.post(f"/api/sessions/{foreign}/resume")
            assert bad.status_code == 409 and "not by vrex serve" in bad.json()["error"]
            assert c.post("/api/sessions/0123456789ab/resume").status_code == 404
            assert c.post("/api/sessions/..%2F..%2Fetc/resume").status_code == 404
            assert c.delete(f"/api/sessions/{sid}").json() == {"closed": sid}
            assert not (sessions / sid).exists()
            assert c.get(f"/api/sessions/{sid}").status_code == 404
    finally:
        server.stop()
    plain = start(model)
    try:
        r = httpx.post(f"{plain.url}/api/sessions/{sid}/resume")
        assert r.status_code == 409 and "--sessions-dir" in r.json()["error"]
    finally:
        plain.stop()


def test_sessions_dir_refused_before_loading(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    t0 = time.monotonic()
    out = subprocess.run([*VREX, "serve", "--sessions-dir", str(blocker / "sub")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--sessions-dir" in out.stderr
    assert time.monotonic() - t0 < 20  # before any model load
