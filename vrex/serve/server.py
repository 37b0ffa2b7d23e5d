"""Running the server: in the foreground (``vrex serve``) or in a thread (tests, ``vrex bench serve``)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn

from vrex.serve.app import create_app
from vrex.serve.hub import Hub, ServeConfig


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (``port`` 0: a free one), so the real port is known before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _uvicorn(hub: Hub) -> uvicorn.Server:
    limits = hub.config.limits
    # ws_max_size: a larger WebSocket message closes that socket (1009) before it is buffered whole.
    config = uvicorn.Config(create_app(hub), log_level="warning", ws="websockets-sansio", ws_max_size=limits.max_frame_bytes + 4096,
                            lifespan="off", timeout_keep_alive=10, limit_concurrency=256)
    return uvicorn.Server(config)


def address(config: ServeConfig, port: int) -> str:
    host = f"[{config.host}]" if ":" in config.host else config.host
    return f"http://{host}:{port}/" + (f"#token={config.token}" if config.token else "")


@dataclass
class RunningServer:
    hub: Hub
    server: uvicorn.Server
    thread: threading.Thread
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.hub.stop()


def start_in_thread(model: Any, config: ServeConfig) -> RunningServer:
    """Serve in a background thread on ``config.host:config.port`` (port 0: any free port)."""
    hub = Hub(model, config).start()
    sock = bind(config.host, config.port)
    server = _uvicorn(hub)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="vrex-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.02)
    return RunningServer(hub, server, thread, sock.getsockname()[1])


def serve_forever(model: Any, config: ServeConfig, announce=print) -> None:
    """Serve until interrupted (Ctrl-C); the caller has checked the config (``resolve_token``)."""
    hub = Hub(model, config).start()
    sock = bind(config.host, config.port)
    announce(address(config, sock.getsockname()[1]))
    try:
        _uvicorn(hub).run(sockets=[sock])
    finally:
        hub.stop()
