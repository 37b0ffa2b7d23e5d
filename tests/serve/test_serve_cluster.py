"""``vrex serve --cluster`` on a real local Ray cluster (127.0.0.1, two engine actors, the real default
model, a real clip): sessions stepped by actors give the events the local server gives; an actor
killed with SIGKILL fails its session with an error naming it, its actor and the cause, over HTTP
and WebSocket, while the other session streams on; ``POST .../resume`` restarts it from its last save
on a new actor, and the stream goes on as if nothing had happened (greedy).

One module-scoped cluster server: Ray and the two model-loading actors start once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from serve_helpers import comparable, feed, start, wait_for
from websockets.sync.client import connect

from vrex.serve.hub import ClusterConfig

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
POLICIES = ("full", "resv")
QUESTION = "What do you see?"


def _gates(events: list[dict]) -> list[float]:
    return [e["stats"]["p_interval"] for e in events if e["type"] == "frame"]


def _answer(c: httpx.Client, sid: str) -> dict:
    answer = c.post(f"/api/sessions/{sid}/ask", json={"text": QUESTION, "wait": True})
    assert answer.status_code == 200, answer.text
    return answer.json()


def _part(c: httpx.Client, sid: str, frames: list[bytes], t0: float) -> None:
    """Frames (each after the previous one was stepped), then a question answered."""
    feed(c, sid, frames, t0=t0)
    _answer(c, sid)


def _events(c: httpx.Client, sid: str) -> list[dict]:
    return c.get(f"/api/sessions/{sid}/events").json()


@pytest.fixture(scope="module")
def reference(server, jpegs) -> dict[str, list[dict]]:
    """The local server (the model in-process): per policy, 4 frames, a question, 2 frames, a question."""
    out = {}
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for policy in POLICIES:
            sid = c.post("/api/sessions", json={"policy": policy, "fps": 2, "theta": 1.0}).json()["id"]
            _part(c, sid, jpegs[:4], 0.0)
            _part(c, sid, jpegs[4:6], 2.0)
            out[policy] = _events(c, sid)
            c.delete(f"/api/sessions/{sid}")
    return out


@pytest.fixture(scope="module")
def cluster_server(tmp_path_factory):
    running = start(None, cluster=ClusterConfig(actors=2), threads=1, sessions_dir=tmp_path_factory.mktemp("sessions"))
    yield running
    running.stop()


def test_cluster_sessions_equal_local_and_survive_a_dead_actor(cluster_server, reference, jpegs):
    hub = cluster_server.hub
    with httpx.Client(base_url=cluster_server.url, timeout=120) as c:
        config = c.get("/api/config").json()
        assert config["cluster"] == {"address": "local", "actors": 2} and config["saves_sessions"]
        sid = {p: c.post("/api/sessions", json={"policy": p, "fps": 2, "theta": 1.0}).json()["id"] for p in POLICIES}
        a, b = sid["full"], sid["resv"]
        pid = hub.get(a).session.remote.where["pid"]
        assert pid != hub.get(b).session.remote.where["pid"]  # one session per actor
        # Both streams at once: the worker sends their frames in one Cluster.step, one call per actor.
        feeders = [threading.Thread(target=_part, args=(c, s, jpegs[:4], 0.0)) for s in (a, b)]
        for f in feeders:
            f.start()
        for f in feeders:
            f.join()
        for s, p in ((a, "full"), (b, "resv")):
            got = comparable(_events(c, s), None)
            assert got[-1][0] == "answer" and got == comparable(reference[p], None)[: len(got)]

        with connect(f"ws://127.0.0.1:{cluster_server.port}/api/sessions/{a}/ws") as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "hello"
            os.kill(pid, signal.SIGKILL)  # the process holding session a dies between two frames
            assert c.post(f"/api/sessions/{a}/frames", params={"t": 2.0}, content=jpegs[4]).status_code == 202
            lost = wait_for(c, a, lambda ev: any(e["type"] == "error" for e in ev))[-1]
            message = lost["message"]
            assert lost["fatal"] and f"session '{a}' is lost" in message and f"pid {pid}" in message and "died" in message
            assert f"POST /api/sessions/{a}/resume restarts it from its last save" in message
            assert json.loads(ws.recv(timeout=10)) == lost  # the page's WebSocket gets the same error
        refused = c.post(f"/api/sessions/{a}/frames", params={"t": 2.5}, content=jpegs[5])
        assert refused.status_code == 409 and f"session '{a}' is lost" in refused.json()["error"]
        assert c.post(f"/api/sessions/{a}/ask", json={"text": QUESTION}).status_code == 409
        assert c.get(f"/api/sessions/{a}").json()["state"] == "failed"

        _part(c, b, jpegs[4:6], 2.0)  # the other actor's session goes on meanwhile
        assert comparable(_events(c, b), None) == comparable(reference["resv"], None)

        resumed = c.post(f"/api/sessions/{a}/resume").json()
        assert resumed["state"] == "live" and (resumed["resumed"]["frame"], resumed["resumed"]["t"]) == (4, 1.5)
        assert hub.get(a).session.remote.where["pid"] not in (pid, None)  # a new actor
        _part(c, a, jpegs[4:6], 2.0)
        events = _events(c, a)
        assert [e["type"] for e in events if e["type"] in ("error", "resume")] == ["error", "resume"]
        assert comparable(events, None) == comparable(reference["full"], None)
        for s, p in ((a, "full"), (b, "resv")):
            assert _gates(_events(c, s)) == pytest.approx(_gates(reference[p]), abs=1e-4)
        answer = next(e for e in events if e["type"] == "answer")
        assert answer["timeline"]["frames"] == [] and "Ray actor" in answer["timeline"]["unknown"]

        # Set aside as the idle reaper does (freed on its actor, kept on disk): the next request
        # naming it loads it on an actor again, with what it said so far.
        hub.sessions.pop(b).close("idle")
        again = c.get(f"/api/sessions/{b}/history").json()
        assert again["session"]["resumed"]["frame"] == 6
        said = [(e["t"], e["text"]) for e in reference["resv"] if e["type"] in ("response", "answer")]
        assert [(i["t"], i["text"]) for i in again["items"]] == said
        feed(c, b, jpegs[6:7], t0=3.0)
        assert c.delete(f"/api/sessions/{b}").json() == {"closed": b}


def test_cluster_options_refused_before_ray_starts():
    vrex = [sys.executable, "-m", "vrex.cli", "serve"]
    out = subprocess.run([*vrex, "--actors", "2"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--actors needs --cluster" in out.stderr
    out = subprocess.run([*vrex, "--cluster", "local", "--actors", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "at least one actor" in out.stderr
    # a head's address where nothing listens, and a malformed one: refused in seconds, naming the address
    # (ray.init retried such an address for minutes)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    t0 = time.monotonic()
    out = subprocess.run([*vrex, "--cluster", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and f"127.0.0.1:{port}" in out.stderr and "nothing answers" in out.stderr
    assert time.monotonic() - t0 < 30
    out = subprocess.run([*vrex, "--cluster", "headnode"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "HOST:PORT" in out.stderr
