"""``vrex serve --cluster``: each served session held by a Ray actor (``vrex.cluster``), not stepped here.

The server keeps what it keeps for a local session (``LiveSession``: input slot, questions, events,
thumbnails, ``serve.jsonl``) around a ``RemoteStream``, which stands for the ``StreamingSession``:
its steps go to the session's actor, its counts follow the events they return. ``ClusterWorker``
replaces the model thread: each round it takes the work of every session that has some and sends
it at once, the frames in one ``Cluster.step`` (one batched call per actor, all actors in parallel),
the questions beside it. Answers carry no read timeline: the reads happen on the actor.

An actor that dies fails its sessions (``SessionLost``) with an error naming the session, the actor's
host and pid and the cause; the other sessions go on. With ``--sessions-dir`` the actors save every
session after each step, and ``POST /api/sessions/<id>/resume`` (``Hub.resume``) restarts a failed one
from its last save in place: a new actor if its own died, the same events and WebSockets going on.
"""

from __future__ import annotations

import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError

from vrex.cluster import Cluster, ClusterStepError, RemoteSession, SessionError, SessionLost
from vrex.engine.session import Event
from vrex.serve.limits import ClientError, ServeLimits
from vrex.serve.live import LiveSession, Question, SessionSettings, cannot_resume, saved_settings
from vrex.serve.saved import SessionsDir, saved_dialogue
from vrex.serve.worker import Worker

START_TIMEOUT_S = 300  # for every actor to start and load its model


class RemoteStream:
    """What ``LiveSession`` uses of its ``StreamingSession``, for a session held by a Ray actor."""

    def __init__(self, remote: RemoteSession, durable: bool, dialogue: list[dict[str, Any]] | None = None):
        self.remote, self.durable = remote, durable
        self.frames, self.t, self.cached_tokens = 0, 0.0, int(remote.where.get("cached_tokens", 0))
        self.dialogue = dialogue or []  # what it said before a resume (LiveSession.restore shows it again)
        self.closed = False

    @property
    def saved_frames(self) -> int | None:
        return self.frames if self.durable else None  # its actor saves it after every step

    def at(self, where: dict[str, Any]) -> None:
        """Where it stands after a resume or restart (``Cluster.restart``'s answer)."""
        self.frames, self.t, self.cached_tokens = where["frame"], where["t"], where["cached_tokens"]

    def stepped(self, t: float, events: list[dict]) -> list[Event]:
        """The events of its frame at ``t``, as ``StreamingSession.push_frame`` returns them."""
        self.frames, self.t = self.frames + 1, t
        return self._events(events)

    def ask(self, text: str) -> list[Event]:
        return self._events(self.remote.ask(text))

    def _events(self, events: list[dict]) -> list[Event]:
        for e in events:
            self.cached_tokens = e["stats"].get("cached_tokens", self.cached_tokens)
        return [Event(e["t"], e["kind"], e["text"], e["stats"]) for e in events]

    def save(self) -> None:
        """Nothing: its actor saved it after the step."""

    def close(self) -> None:
        """Free it on its actor; its saved directory stays (``Hub.remove`` deletes it when asked to)."""
        if not self.closed:
            self.closed = True
            try:
                self.remote.close(keep_saved=True)
            except SessionError:
                pass  # its actor died: nothing left to free


def client_error(session: LiveSession, error: BaseException) -> BaseException:
    """A lost session's error for HTTP clients: the cluster's words (session, actor host and pid, cause),
    then what a client can do instead of the Python call ``Cluster`` suggests."""
    if not isinstance(error, SessionLost):
        return error
    then = (f"POST /api/sessions/{session.id}/resume restarts it from its last save" if session.session.durable
            else "its state is gone: create a new session (a server started with --sessions-dir can restart one)")
    return SessionLost(f"{str(error).rsplit('; ', 1)[0]}; {then}")


class ServeCluster:
    """The server's Ray cluster: sessions opened, resumed, restarted and closed on its actors, one call
    at a time (``Cluster`` is not thread-safe; HTTP handlers run in many threads)."""

    def __init__(self, address: str, actors: int, threads: int | None, connector: str | None,
                 sessions_dir: Path | None, max_streams: int):
        local = address == "local"
        # A local Ray gets a CPU per actor at least: an actor Ray cannot place would leave its sessions
        # waiting forever (on a cluster, its nodes' CPUs decide).
        num_cpus = max(os.cpu_count() or 1, actors) if local else None
        self.address, self.durable = address, sessions_dir is not None
        try:
            self.cluster = Cluster(None if local else address, actors=actors, cpus_per_actor=1, threads=threads,
                                   num_cpus=num_cpus, connector=connector, sessions_dir=sessions_dir, max_streams=max_streams)
        except (ConnectionError, ValueError) as e:
            raise RuntimeError(f"--cluster {address}: cannot start or join Ray: {e}") from e
        try:  # every actor up with its model before the server answers (a bad model fails here, once)
            ray.get([actor.where.remote() for actor in self.cluster.actors], timeout=START_TIMEOUT_S)
        except Exception as e:
            self.cluster.shutdown()
            why = (f"not all up within {START_TIMEOUT_S} s: has the cluster a free CPU for each (`ray status`)?"
                   if isinstance(e, GetTimeoutError) else str(e).strip().splitlines()[0][:300])
            raise RuntimeError(f"--cluster {address}: the {actors} actor(s) did not start: {why}") from e
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"address": self.address, "actors": len(self.cluster.actors)}

    def worker(self, sessions: Callable[[], list[LiveSession]], on_idle: Callable[[], None]) -> "ClusterWorker":
        return ClusterWorker(self.cluster, sessions, on_idle)

    def open(self, settings: SessionSettings, limits: ServeLimits, saved: SessionsDir | None) -> LiveSession:
        sid = uuid.uuid4().hex[:12]
        config = {"theta": settings.theta, "min_response_gap": settings.min_response_gap, "recent_tokens": settings.recent_tokens}
        with self._lock:
            try:  # the serve settings ride in the save's manifest, as a local server's do
                remote = self.cluster.open_session(settings.policy, sid, run_settings={"serve": settings.describe()}, **config)
            except SessionLost as e:
                raise ClientError(503, f"session {sid} could not start: {e}") from None
            except (SessionError, ValueError) as e:
                raise ClientError(500, f"session {sid} could not start on its actor: {e}") from None
        return self._live(LiveSession.around(sid, RemoteStream(remote, self.durable), settings, limits,
                                             saved.path(sid) if saved is not None else None))

    def resume(self, sid: str, saved: SessionsDir, limits: ServeLimits) -> LiveSession:
        """A saved session the cluster does not hold (saved by an earlier server, or closed here), loaded
        on the actor with the fewest sessions; as ``LiveSession.resume``."""
        directory = saved.path(sid)
        try:
            settings = saved_settings(directory)
        except (KeyError, TypeError, ValueError) as e:
            raise cannot_resume(sid, directory, e) from None
        with self._lock:
            try:
                remote = self.cluster.resume(sid)
            except SessionLost as e:
                raise ClientError(503, f"session {sid} could not resume: {e}") from None
            except (SessionError, ValueError) as e:
                raise cannot_resume(sid, directory, e) from None
        stream = RemoteStream(remote, self.durable)
        stream.at(remote.resumed)
        try:
            try:
                stream.dialogue = saved_dialogue(directory)
            except ValueError as e:  # SessionDamagedError: its files cannot be read
                raise cannot_resume(sid, directory, e) from None
            return self._live(LiveSession.restore(sid, settings, limits, None, stream, directory))
        except BaseException:
            stream.close()  # not left loaded on its actor
            raise

    def restart(self, session: LiveSession) -> bool:
        """A failed session rebuilt from its last save where it was (a new actor if its own died): the same
        ``LiveSession`` goes on. False when the cluster no longer holds it (closed: ``resume`` loads it)."""
        stream: RemoteStream = session.session
        if stream.closed:
            return False
        with self._lock:
            try:
                where = stream.remote.restart()
            except SessionLost as e:
                raise ClientError(503, f"session {session.id} could not restart: {e}") from None
            except SessionError as e:
                raise ClientError(409, str(e)) from None
        stream.at(where)
        session.restarted(where)
        return True

    def _live(self, session: LiveSession) -> LiveSession:
        session.on_close = session.session.close
        return session

    def shutdown(self) -> None:
        self.cluster.shutdown()


class ClusterWorker(Worker):
    """Steps every session with work at once on the actors (see the module docstring)."""

    def __init__(self, cluster: Cluster, sessions: Callable[[], list[LiveSession]], on_idle: Callable[[], None]):
        super().__init__(sessions, on_idle=on_idle)
        self.cluster = cluster
        # Questions wait on their actors' answers beside the frames' step (each its own Ray call).
        self._asks = ThreadPoolExecutor(max_workers=4, thread_name_prefix="vrex-serve-ask")

    def stop(self) -> None:
        super().stop()
        self._asks.shutdown(wait=False, cancel_futures=True)

    def _round(self, busy: list[LiveSession]) -> None:
        frames, asks = {}, []
        for session in busy:
            work = session.take()
            if isinstance(work, Question):
                asks.append(self._asks.submit(self._ask, session, work))
            elif work is not None:
                frames[session.session.remote] = (session, work, session.frame_time(work))
        if frames:
            self._step(frames)
        for ask in asks:
            ask.result()
        self.steps += len(frames) + len(asks)

    def _step(self, frames: dict[RemoteSession, tuple]) -> None:
        try:
            results, errors = self.cluster.step({r: (t, work.image) for r, (_, work, t) in frames.items()}), {}
        except ClusterStepError as e:
            results, errors = e.results, e.errors
        except Exception as e:  # noqa: BLE001 - an actor call that failed outside a session's step
            results, errors = {}, dict.fromkeys(frames, e)
        for remote, (session, work, t) in frames.items():
            try:
                if remote in errors:
                    raise errors[remote]
                session.pushed(work, t, session.session.stepped(t, results[remote]))
            except Exception as e:  # noqa: BLE001 - isolation, as the local worker
                self._failed(session, e)

    def _ask(self, session: LiveSession, question: Question) -> None:
        try:
            session.answered(question, session.session.ask(question.text))
        except Exception as e:  # noqa: BLE001
            self._failed(session, e)

    def _failed(self, session: LiveSession, error: BaseException) -> None:
        if session.state == "live":  # one closed meanwhile has nothing to report
            self.errors += 1
            session.fail(client_error(session, error))
