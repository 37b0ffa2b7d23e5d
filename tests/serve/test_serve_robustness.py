"""Bad input and abuse never take the server or another session down (asserted while one streams)."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time

import httpx
import pytest
from serve_helpers import feed, wait_for
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect


class Streamer(threading.Thread):
    """A well-behaved client posting real frames at 4 fps for as long as the test runs."""

    def __init__(self, url: str, sid: str, frames: list[bytes]):
        super().__init__(daemon=True)
        self.url, self.sid, self.frames, self.stop = url, sid, frames, threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            i = 0
            while not self.stop.is_set():
                c.post(f"/api/sessions/{self.sid}/frames", content=self.frames[i % len(self.frames)])
                i += 1
                time.sleep(0.25)


def raw(port: int, data: bytes, read: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        return s.recv(4096) if read else b""


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_abuse_leaves_server_and_other_sessions_streaming(server, client, jpegs, clip_path):
    port = server.port
    other = client.post("/api/sessions", json={"fps": 4, "theta": 0}).json()["id"]
    streamer = Streamer(server.url, other, jpegs)
    streamer.start()
    wait_for(client, other, lambda ev: any(e["type"] == "frame" for e in ev))
    before = client.get(f"/api/sessions/{other}").json()["counters"]["processed"]
    sid = client.post("/api/sessions", json={"fps": 4}).json()["id"]
    try:
        # Malformed JSON and bad fields: 422, never a 500.
        assert client.post("/api/sessions", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
        assert client.post(f"/api/sessions/{sid}/ask", json={"txt": 1}).status_code == 422
        # A non-image frame and a 50 MB frame (streamed, no length announced).
        bad = client.post(f"/api/sessions/{sid}/frames", content=b"GIF89a this is not an image")
        assert bad.status_code == 422 and "not a readable image" in bad.json()["error"]
        big = client.post(f"/api/sessions/{sid}/frames", content=(b"\xff" * 2**20 for _ in range(50)))
        assert big.status_code == 413 and "exceeds the limit" in big.json()["error"]
        # WebSocket: malformed JSON, unknown message, binary garbage -> error messages, socket stays open.
        with connect(f"ws://127.0.0.1:{port}/api/sessions/{sid}/ws") as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "hello"
            for msg in ["{oops", json.dumps({"type": "dance"}), json.dumps({"type": "ask", "text": "x" * 5000}), os.urandom(3000)]:
                ws.send(msg)
                reply = json.loads(ws.recv(timeout=10))
                assert reply["type"] == "error" and reply["status"] in (400, 422), reply
            ws.send(jpegs[0])  # still usable
        # A 50 MB frame over the WebSocket: that socket is closed (1009), nothing else.
        with connect(f"ws://127.0.0.1:{port}/api/sessions/{sid}/ws", max_size=None) as ws:
            ws.recv(timeout=10)
            with pytest.raises(ConnectionClosed):
                ws.send(b"\xff\xd8" + b"\0" * 50 * 2**20)
                ws.recv(timeout=10)
        # A truncated upload: half of a real clip.
        half = clip_path.read_bytes()[: clip_path.stat().st_size // 2]
        up = client.post(f"/api/sessions/{sid}/upload", params={"name": "half.mp4"}, content=half)
        assert up.status_code in (200, 422), up.text
        if up.status_code == 200:
            wait_for(client, sid, lambda ev: any(e["type"] == "source" for e in ev), timeout=60)
        # Sockets closed mid-body: an upload, a frame, and a WebSocket frame cut short.
        raw(port, f"POST /api/sessions/{sid}/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n".encode() + half[:5000])
        raw(port, f"POST /api/sessions/{sid}/frames HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\n".encode() + jpegs[0][:100])
        key = base64.b64encode(os.urandom(16)).decode()
        handshake = (f"GET /api/sessions/{sid}/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(handshake)
            assert b" 101 " in s.recv(4096)
            s.sendall(bytes([0x82, 0xFE]) + (60000).to_bytes(2, "big") + os.urandom(4) + jpegs[0][:300])  # binary, masked, cut
        # 100 rapid connects: WebSocket handshakes dropped at once, and bare TCP connects.
        for _ in range(100):
            with connect(f"ws://127.0.0.1:{port}/api/sessions/{other}/ws"):
                pass
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        time.sleep(1.5)
        assert client.get("/health").json() == {"status": "ok", "worker": True, "sessions": 2, "auth": False}
        after = client.get(f"/api/sessions/{other}").json()
        assert after["state"] == "live" and after["counters"]["processed"] > before
        assert server.hub.get(other)._subscribers == []  # every closed socket unsubscribed
        feed(client, sid, jpegs[:1], t0=1000.0)  # the abused session still works
    finally:
        streamer.stop.set()
        streamer.join(5)
        client.delete(f"/api/sessions/{sid}")
        client.delete(f"/api/sessions/{other}")


def test_a_crashing_session_does_not_touch_another(server, client, jpegs):
    a = client.post("/api/sessions", json={"theta": 0}).json()["id"]
    b = client.post("/api/sessions", json={"theta": 0}).json()["id"]
    server.hub.get(a).session.store = None  # its next model step raises inside the worker
    client.post(f"/api/sessions/{a}/frames", content=jpegs[0])
    events = wait_for(client, a, lambda ev: any(e["type"] == "error" for e in ev))
    assert "session failed" in events[-1]["message"]
    assert client.get(f"/api/sessions/{a}").json()["state"] == "failed"
    assert client.post(f"/api/sessions/{a}/frames", content=jpegs[1]).status_code == 409
    feed(client, b, jpegs[:2])
    assert client.get(f"/api/sessions/{b}").json()["state"] == "live"
    assert client.get("/health").json()["status"] == "ok"
    client.delete(f"/api/sessions/{a}")
    client.delete(f"/api/sessions/{b}")
