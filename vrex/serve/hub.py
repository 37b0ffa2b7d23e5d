"""The server's state: the shared model, the sessions, the worker thread, the operator's settings."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vrex.kv.policies import POLICIES, make_policy
from vrex.serve.limits import ClientError, ServeLimits, check_fps
from vrex.serve.live import LiveSession, SessionSettings
from vrex.serve.saved import SessionsDir
from vrex.serve.worker import Worker


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # required on every /api request when set (always set off loopback)
    limits: ServeLimits = field(default_factory=ServeLimits)
    media_dir: Path | None = None
    allow_urls: bool = False
    allowed_origins: tuple[str, ...] = ()  # extra page origins allowed to open WebSockets / POST
    threads: int | None = None  # torch threads of the worker (None: torch's default)
    default_policy: str = "full"
    sessions_dir: Path | None = None  # save every session there as it goes; resume by id after a restart
    cluster: ClusterConfig | None = None  # sessions on Ray actors (vrex.serve.cluster) instead of this process


@dataclass
class ClusterConfig:
    """``vrex serve --cluster``: ``address`` "local" (a Ray started here, bound to 127.0.0.1), "auto" (the
    cluster this machine joined) or a head's address; ``actors`` engine actors, each loading the model
    (``connector``) with the server's ``threads``."""
    address: str = "local"
    actors: int = 1
    connector: str | None = "auto"


def build_policy(spec: str) -> Any:
    """A policy from a name or spec string (``resv``, ``resv[ratio=0.2]``); ClientError names the bad spec."""
    try:
        return make_policy(spec)
    except (ValueError, TypeError, SyntaxError) as e:
        raise ClientError(422, f"policy {spec!r}: {e}") from None


class Hub:
    def __init__(self, model: Any, config: ServeConfig):
        """``model``: the model sessions step on here; None with ``config.cluster`` (each actor loads its own)."""
        self.model, self.config = model, config
        self.sessions: dict[str, LiveSession] = {}
        self._lock = threading.Lock()
        self.model_lock = threading.Lock()  # one model step at a time: the worker's steps and session set-up
        self.started = time.monotonic()
        self.saved = SessionsDir(config.sessions_dir) if config.sessions_dir is not None else None
        self.cluster = None
        if config.cluster is None:
            self.worker = Worker(self.list, threads=config.threads, on_idle=self.reap, model_lock=self.model_lock)
        else:
            from vrex.serve.cluster import ServeCluster  # imports Ray: only here

            c = config.cluster
            self.cluster = ServeCluster(c.address, c.actors, config.threads, c.connector, config.sessions_dir,
                                        max_streams=config.limits.max_sessions)
            self.worker = self.cluster.worker(self.list, on_idle=self.reap)
        self._resume_lock = threading.Lock()  # one resume of a session at a time

    def start(self) -> "Hub":
        self.worker.start()
        return self

    def stop(self) -> None:
        for session in self.list():
            session.close("server stopped")
        self.worker.stop()
        if self.cluster is not None:
            self.cluster.shutdown()

    def list(self) -> list[LiveSession]:
        with self._lock:
            return list(self.sessions.values())

    def get(self, sid: str) -> LiveSession:
        """A session by id; one saved in ``--sessions-dir`` but not loaded (after a restart, or reaped
        while idle) is resumed first, so a client reconnecting with its id just goes on."""
        with self._lock:
            session = self.sessions.get(sid)
        if session is None and self.saved is not None and self.saved.has(sid):
            return self.resume(sid)
        if session is None:
            raise ClientError(404, f"no session {sid!r}")
        return session

    def resume(self, sid: str) -> LiveSession:
        """The session ``sid`` from its last save: loaded if not live here (a failed or closed one is
        replaced by its last save); a live one is returned as it is."""
        if self.saved is None:
            raise ClientError(409, "sessions are not saved on this server: start it with --sessions-dir DIR to resume sessions")
        with self._resume_lock:
            with self._lock:
                current = self.sessions.get(sid)
            if current is not None and current.state == "live":
                return current
            if not self.saved.has(sid):
                raise ClientError(404, f"no saved session {sid!r} in the server's sessions directory")
            if self.cluster is not None and current is not None and current.state == "failed" and self.cluster.restart(current):
                return current  # rebuilt on its actor (a new one if it died), its clients still attached
            self._check_room()
            if self.cluster is not None:
                session = self.cluster.resume(sid, self.saved, self.config.limits)
            else:
                # Not under the model lock: loading replays the saved steps into the session's own cache
                # and policy without running the model, so the other sessions keep streaming meanwhile.
                session = LiveSession.resume(self.model, sid, self.saved, self.config.limits)
            if current is not None:
                current.close("replaced by its last save")
            session.wake = self.worker.wake
            with self._lock:
                self.sessions[sid] = session
        return session

    def _check_room(self) -> None:
        limits = self.config.limits
        with self._lock:
            live = sum(s.state == "live" for s in self.sessions.values())
        if live >= limits.max_sessions:
            raise ClientError(429, f"the server already hosts {live} sessions (limit {limits.max_sessions}); close one first")

    def create(self, settings: SessionSettings) -> LiveSession:
        limits = self.config.limits
        check_fps(settings.fps, limits)
        if not 0.0 <= settings.theta <= 1.0:
            raise ClientError(422, f"theta must be in [0, 1], got {settings.theta}")
        if settings.recent_tokens is not None and settings.recent_tokens < 0:
            raise ClientError(422, f"recent_tokens must be >= 0, got {settings.recent_tokens}")
        policy = build_policy(settings.policy)
        self.reap()
        self._check_room()
        if self.cluster is not None:
            session = self.cluster.open(settings, limits, self.saved)
        else:
            # Building the session runs the system prompt through the shared model: under the model lock.
            with self.model_lock:
                try:
                    session = LiveSession(self.model, policy, settings, limits, self.saved)
                except OSError as e:  # the first save (SessionSaveError names the directory and why)
                    raise ClientError(507, f"the session could not be saved: {e}") from None
        with self._lock:
            if sum(s.state == "live" for s in self.sessions.values()) >= limits.max_sessions:
                session.on_close()
                if self.saved is not None:
                    self.saved.remove(session.id)
                raise ClientError(429, f"the server already hosts {limits.max_sessions} sessions (the limit); close one first")
            session.wake = self.worker.wake
            self.sessions[session.id] = session
        return session

    def remove(self, sid: str) -> None:
        """Close a session for good: with ``--sessions-dir`` its saved directory goes too."""
        with self._lock:
            session = self.sessions.pop(sid, None)
        if session is None and not (self.saved is not None and self.saved.has(sid)):
            raise ClientError(404, f"no session {sid!r}")
        if session is not None:
            session.close("closed by client")
        if self.saved is not None:
            self.saved.remove(sid)

    def reap(self) -> None:
        """Close and forget sessions idle longer than the limit with no client attached."""
        idle = self.config.limits.idle_timeout_s
        now = time.monotonic()
        for session in self.list():
            if not session._subscribers and now - session.last_active > idle:
                kept = "; saved: its id resumes it" if session.sidecar is not None else ""
                session.close(f"idle for more than {idle:.0f} s{kept}")
                with self._lock:
                    self.sessions.pop(session.id, None)

    def policies(self) -> list[str]:
        return list(POLICIES)

    def model_name(self) -> str:
        if self.model is None:  # --cluster: each actor loads its own
            return f"load_videollm(connector={self.config.cluster.connector!r}) on each Ray actor"
        return getattr(self.model, "name", type(self.model).__name__)
