"""A real HTTP server on 127.0.0.1 that serves clips and breaks a response on purpose.

Each served path maps to bytes; a fault ("close" or "stall") fires once, on the first response
that covers its byte offset: the body is sent up to that offset, then the connection is closed
at once or held open without data (a stall) until the test ends. Range requests ("bytes=N-")
are answered with 206 when ``ranges`` is on, so FFmpeg can seek over HTTP.
"""

from __future__ import annotations

import http.server
import socket
import threading
from dataclasses import dataclass, field


@dataclass
class Fault:
    mode: str  # "close" or "stall"
    at: int  # byte offset in the file where the body stops


@dataclass
class Route:
    bodies: list[bytes]  # what request 1, 2, ... gets (the last one repeats); b"" -> 404
    fault: Fault | None = None
    length: bool = True  # send Content-Length (a file); without it the body is close-delimited (live)
    requests: list[str | None] = field(default_factory=list)  # Range header of each request


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: a fault never leaks into the next

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        server: FaultyServer = self.server  # type: ignore[assignment]
        route = server.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        route.requests.append(rng)
        data = route.bodies[min(len(route.requests), len(route.bodies)) - 1]
        if not data:
            self.send_error(404)
            return
        start = int(rng[6:].split("-")[0] or 0) if server.ranges and rng and rng.startswith("bytes=") else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if server.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if route.length:
            self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        fault, body = route.fault, data[start:]
        try:
            if fault is not None and start < fault.at:
                route.fault = None  # once
                self.wfile.write(body[: fault.at - start])
                self.wfile.flush()
                if fault.mode == "stall":
                    server.release.wait(30)
                self.connection.shutdown(socket.SHUT_RDWR)
            else:
                self.wfile.write(body)
        except OSError:
            pass  # the client went away first


class FaultyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, ranges: bool = True):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.ranges = ranges
        self.routes: dict[str, Route] = {}
        self.release = threading.Event()  # ends every stall
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def add(self, path: str, route: Route) -> str:
        self.routes[path] = route
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def stop(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()
        self.thread.join(5)
