"""Network sources against a throw-away HTTP server on the loopback interface."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
import time

import pytest

from vrex.io import VideoSourceError, open_source


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def http_base(assets):
    """http://127.0.0.1:<random port> serving the shared videos folder; stopped afterwards."""
    handler = functools.partial(_QuietHandler, directory=str(assets / "videos"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens once the socket is closed


def test_http_stream_matches_local_file(http_base, video):
    url = f"{http_base}/timecode_16s.mp4"
    with open_source(url, fps=2, size=16) as src:
        remote = [f.t for f in src]
        assert src.info.kind == "url" and src.info.codec == "h264"
    with open_source(video("timecode_16s.mp4"), fps=2, size=16) as src:
        local = [f.t for f in src]
    assert remote == local and len(local) == 32


def test_http_404_names_the_url(http_base):
    url = f"{http_base}/missing.mp4"
    with pytest.raises(VideoSourceError, match="404") as err:
        open_source(url)
    assert url in str(err.value)


def test_http_mp4_needing_range_requests_fails_clearly(http_base):
    # cockatoo.mp4 keeps its index at the end; Python's test server cannot seek there.
    url = f"{http_base}/cockatoo.mp4"
    with pytest.raises(VideoSourceError) as err:
        with open_source(url, size=16) as src:  # fails when opening or at the first read
            list(src)
    assert str(err.value).startswith(f"{url}: ")


@pytest.mark.parametrize("scheme", ["http", "rtsp"])
def test_refused_connection_fails_fast(scheme):
    url = f"{scheme}://127.0.0.1:{_closed_port()}/stream"
    start = time.monotonic()
    with pytest.raises(VideoSourceError) as err:
        open_source(url, timeout=3)
    assert url in str(err.value) and time.monotonic() - start < 3
