"""Small client helpers shared by the server tests (plain HTTP with httpx, WebSockets with websockets)."""

from __future__ import annotations

import time

import httpx


def wait_for(client: httpx.Client, sid: str, pred, timeout: float = 60.0, after: int = 0) -> list[dict]:
    """Poll the session's events until ``pred(events)`` is true; returns all events seen."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = client.get(f"/api/sessions/{sid}/events", params={"after": after, "wait": 1}).json()
        if new:
            seen += new
            after = new[-1]["seq"]
        if pred(seen):
            return seen
    raise AssertionError(f"timed out; last events: {[e.get('type') for e in seen[-10:]]}")


def stream(client: httpx.Client, sid: str, frames: list[bytes], t0: float = 0.0, dt: float = 0.5) -> list[dict]:
    """Post frames with explicit stream times (no pacing): returns the server's replies."""
    return [client.post(f"/api/sessions/{sid}/frames", params={"t": t0 + i * dt}, content=f).json() for i, f in enumerate(frames)]


def feed(client: httpx.Client, sid: str, frames: list[bytes], t0: float = 0.0, dt: float = 0.5, timeout: float = 60.0) -> None:
    """Post frames one at a time, each after the previous one was processed (nothing dropped)."""
    start = client.get(f"/api/sessions/{sid}").json()["counters"]["processed"]
    for i, f in enumerate(frames):
        assert client.post(f"/api/sessions/{sid}/frames", params={"t": t0 + i * dt}, content=f).json()["accepted"]
        deadline = time.monotonic() + timeout
        while client.get(f"/api/sessions/{sid}").json()["counters"]["processed"] < start + i + 1:
            assert time.monotonic() < deadline, "frame not processed in time"
            time.sleep(0.02)


def comparable(events: list[dict], digits: int | None = 4) -> list[tuple]:
    """What greedy decoding fixes: each frame's cached tokens and gate (``digits`` None: left out, for
    runs whose arithmetic may differ in the last bits), every narration and answer."""
    out = []
    for e in events:
        if e["type"] == "frame":
            gate = round(e["stats"]["p_interval"], digits) if digits is not None else None
            out.append(("frame", e["t"], e["stats"]["cached_tokens"], gate))
        elif e["type"] in ("response", "answer"):
            out.append((e["type"], e["t"], e["text"]))
    return out


def start(model, **kw):
    from vrex.serve.hub import ServeConfig
    from vrex.serve.server import start_in_thread

    return start_in_thread(model, ServeConfig(**{"port": 0, **kw}))  # port 0: any free one
