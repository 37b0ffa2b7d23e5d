"""Safe by default: loopback bind, token off loopback, 401 without it, origin checks, limits as 4xx."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image
from serve_helpers import start
from websockets.exceptions import InvalidStatus, ConnectionClosed
from websockets.sync.client import connect

from vrex.serve.limits import ServeLimits

TOKEN = "s3cret-token-for-tests"
VREX = [sys.executable, "-m", "vrex.cli"]


def test_non_loopback_bind_without_token_refuses_at_once():
    t0 = time.monotonic()
    out = subprocess.run([*VREX, "serve", "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--token" in out.stderr
    assert time.monotonic() - t0 < 20  # before any model load


def test_vrex_serve_binds_loopback_and_serves_page_and_health():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*VREX, "serve", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.3)
        assert health.json()["status"] == "ok"
        assert "<title>vrex serve</title>" in httpx.get(f"http://127.0.0.1:{port}/").text
        with pytest.raises(httpx.TransportError):  # bound to loopback only
            ip = socket.gethostbyname(socket.gethostname())
            if ip.startswith("127."):
                raise httpx.ConnectError("no non-loopback address to probe")
            httpx.get(f"http://{ip}:{port}/health", timeout=2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def guarded(model):
    limits = ServeLimits(max_sessions=2, max_upload_bytes=2**20, max_fps=4.0)
    running = start(model, token=TOKEN, limits=limits)
    yield running
    running.stop()


def test_token_required_on_api_and_websocket(guarded):
    url = guarded.url
    assert httpx.get(f"{url}/health").json()["auth"] is True  # health and page stay open
    assert httpx.get(f"{url}/api/sessions").status_code == 401
    assert httpx.get(f"{url}/api/sessions", headers={"Authorization": "Bearer wrong-token-x"}).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    sid = httpx.post(f"{url}/api/sessions", json={}, headers=auth).json()["id"]
    assert httpx.post(f"{url}/api/sessions/{sid}/ask", json={"text": "hi"}).status_code == 401
    with pytest.raises((InvalidStatus, ConnectionClosed)):
        with connect(f"ws://127.0.0.1:{guarded.port}/api/sessions/{sid}/ws") as ws:
            ws.recv(timeout=5)
    with connect(f"ws://127.0.0.1:{guarded.port}/api/sessions/{sid}/ws?token={TOKEN}") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
    httpx.delete(f"{url}/api/sessions/{sid}", headers=auth)


def test_foreign_origins_are_refused(guarded):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    evil = {**auth, "Origin": "http://evil.example"}
    assert httpx.post(f"{guarded.url}/api/sessions", json={}, headers=evil).status_code == 403
    sid = httpx.post(f"{guarded.url}/api/sessions", json={}, headers={**auth, "Origin": guarded.url}).json()["id"]
    with pytest.raises((InvalidStatus, ConnectionClosed)):
        with connect(f"ws://127.0.0.1:{guarded.port}/api/sessions/{sid}/ws?token={TOKEN}", origin="http://evil.example") as ws:
            ws.recv(timeout=5)
    httpx.delete(f"{guarded.url}/api/sessions/{sid}", headers=auth)


def test_limits_answer_with_clear_4xx(guarded):
    c = httpx.Client(base_url=guarded.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    r = c.post("/api/sessions", json={"fps": 30})
    assert r.status_code == 422 and "fps" in r.json()["error"]
    r = c.post("/api/sessions", json={"policy": "resv[nope=1]"})
    assert r.status_code == 422 and "resv" in r.json()["error"]
    a, b = (c.post("/api/sessions", json={}).json()["id"] for _ in range(2))
    r = c.post("/api/sessions", json={})
    assert r.status_code == 429 and "limit 2" in r.json()["error"]
    r = c.post(f"/api/sessions/{a}/ask", json={"text": "why? " * 200})
    assert r.status_code == 422 and "500" in r.json()["error"]
    buf = io.BytesIO()
    Image.new("RGB", (5000, 8)).save(buf, "PNG")
    r = c.post(f"/api/sessions/{a}/frames", content=buf.getvalue())
    assert r.status_code == 413 and "5000x8" in r.json()["error"]
    r = c.post(f"/api/sessions/{a}/upload", content=os.urandom(2 * 2**20))
    assert r.status_code == 413 and "upload" in r.json()["error"]
    r = c.post(f"/api/sessions/{a}/source", json={"media": "../../etc/passwd"})
    assert r.status_code == 403 and "--media-dir" in r.json()["error"]
    r = c.post(f"/api/sessions/{a}/source", json={"url": "rtsp://camera.local/x"})
    assert r.status_code == 403 and "--allow-urls" in r.json()["error"]
    for sid in (a, b):
        c.delete(f"/api/sessions/{sid}")
