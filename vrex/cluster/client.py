"""``vrex.cluster``: live sessions as Ray actors, on one machine or many.

Each actor is one batched engine (``vrex.cluster.actor.EngineActor``: its own model copy and a
``BatchEngine``); Ray places actors on any node of the cluster. ``Cluster.open_session`` routes a
new session to the actor with the fewest sessions and returns a ``RemoteSession`` bound to it, so
every later call goes to that actor. ``Cluster.step`` sends each actor its sessions' frames in one
call (stepped as one batch there), all actors at once. An actor that dies (its process or node
lost) turns every later call of its sessions into ``SessionLost``, naming the session and where
it ran; the other actors' sessions go on.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Mapping

from PIL import Image

try:
    import ray
    from ray.exceptions import RayActorError
except ImportError as e:  # pragma: no cover - the extra is installed by make setup
    raise ImportError("vrex.cluster needs Ray: `make setup` installs it (requirements.lock), or "
                      "pip install 'vrex[cluster]'") from e

from vrex.cluster.actor import EngineActor


class SessionError(RuntimeError):
    """A session's step raised inside its actor (the actor and its other sessions are fine)."""


class SessionLost(SessionError):
    """The actor holding the session died; the session's state went with it."""


class ClusterStepError(RuntimeError):
    """Some sessions failed in ``Cluster.step``: ``errors`` {session: exception}; ``results`` the others' events."""

    def __init__(self, errors: dict, results: dict):
        super().__init__("; ".join(str(e) for e in errors.values()))
        self.errors, self.results = errors, results


class RemoteSession:
    """A live session on one actor of the cluster (returned by ``Cluster.open_session``)."""

    def __init__(self, cluster: "Cluster", sid: str, actor, where: dict[str, Any]):
        self.cluster, self.id, self._actor, self.where = cluster, sid, actor, where

    def __repr__(self) -> str:
        return f"RemoteSession({self.id!r} on {self.where.get('host')} pid {self.where.get('pid')})"

    def push_frame(self, t: float, image: Image.Image) -> list[dict]:
        """Prefill one frame; the events it caused (``Event.to_dict()`` form)."""
        return self._one(self._actor.step.remote({self.id: (t, image)}))

    def ask(self, text: str, t: float | None = None) -> list[dict]:
        return self._one(self._actor.ask.remote({self.id: (text, t)}))

    def memory(self) -> dict[str, Any]:
        return self._get(self._actor.memory.remote())["streams"][self.id]

    def close(self) -> None:
        try:
            self._get(self._actor.close.remote(self.id))
        finally:
            self.cluster._sessions.pop(self.id, None)

    def _one(self, ref) -> list[dict]:
        events = self._get(ref)[self.id]
        _raise_on_error(self, events)
        return events

    def _get(self, ref):
        return self.cluster._get(self, ref)


def _raise_on_error(session: RemoteSession, events: list[dict]) -> None:
    for ev in events:
        if ev["kind"] == "error":
            raise SessionError(f"session {session.id!r}: {ev['text']}")


class Cluster:
    """Sessions on Ray actors. ``address``: None starts a local Ray bound to 127.0.0.1 (``num_cpus``
    CPUs); ``"auto"`` joins the cluster this machine belongs to (``ray start --head`` / ``--address``);
    ``"ray://HOST:10001"`` connects a client to a remote head. ``actors``: engine actors to spread
    sessions over, each with ``cpus_per_actor`` CPUs and ``threads`` torch threads. ``connector``:
    the model each actor loads (``load_videollm``'s argument)."""

    def __init__(self, address: str | None = None, *, actors: int = 1, cpus_per_actor: float = 1,
                 threads: int | None = None, num_cpus: int | None = None, connector: str | None = "auto",
                 device_budget_bytes: int | None = None, max_streams: int = 8):
        if actors < 1:
            raise ValueError(f"actors must be >= 1, got {actors}")
        self._started = False
        if not ray.is_initialized():
            if address is None:
                _loopback_only()
                ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                         log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            self._started = True
        remote = ray.remote(EngineActor).options(num_cpus=cpus_per_actor, max_restarts=0,
                                                 scheduling_strategy="SPREAD")
        self._actors = [remote.remote(threads=threads, connector=connector, device_budget_bytes=device_budget_bytes,
                                      max_streams=max_streams) for _ in range(actors)]
        self._dead: set[int] = set()
        self._sessions: dict[str, RemoteSession] = {}
        self._ids = itertools.count()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def actors(self) -> list:
        """The engine actors' handles (e.g. ``ray.kill`` one to see its sessions reported lost)."""
        return list(self._actors)

    def open_session(self, policy: str = "resv", sid: str | None = None, **config) -> RemoteSession:
        """A new session (``policy``: any ``make_policy`` spec; ``config``: ``SessionConfig`` fields) on
        the live actor with the fewest sessions."""
        sid = sid or f"s{next(self._ids)}"
        if sid in self._sessions:
            raise ValueError(f"session {sid!r} already exists")
        load = {i: 0 for i in range(len(self._actors)) if i not in self._dead}
        if not load:
            raise SessionLost("every actor of this cluster has died; start a new Cluster")
        for s in self._sessions.values():
            i = self._actors.index(s._actor)
            if i in load:
                load[i] += 1
        index = min(load, key=lambda i: (load[i], i))
        actor = self._actors[index]
        try:
            where = ray.get(actor.open.remote(sid, policy, config))
        except RayActorError as e:
            self._dead.add(index)
            raise SessionLost(f"session {sid!r} could not start: its actor died ({_cause(e)})") from e
        session = RemoteSession(self, sid, actor, where)
        self._sessions[sid] = session
        return session

    def step(self, frames: Mapping[RemoteSession, tuple[float, Image.Image]]) -> dict[RemoteSession, list[dict]]:
        """A frame for each given session: one batched call per actor, all actors in parallel."""
        by_actor: dict[int, dict[str, tuple]] = {}
        for session, tf in frames.items():
            by_actor.setdefault(self._actors.index(session._actor), {})[session.id] = tf
        refs = {i: self._actors[i].step.remote(part) for i, part in by_actor.items()}
        results, errors = {}, {}
        for i, ref in refs.items():
            members = [s for s in frames if self._actors.index(s._actor) == i]
            try:
                out = self._get(members[0], ref)
            except SessionLost:
                errors.update({s: SessionLost(self._lost(s, "it died during this step")) for s in members})
                continue
            for s in members:
                try:
                    _raise_on_error(s, out[s.id])
                    results[s] = out[s.id]
                except SessionError as e:
                    errors[s] = e
        if errors:
            raise ClusterStepError(errors, results)
        return results

    def _get(self, session: RemoteSession, ref):
        index = self._actors.index(session._actor)
        if index in self._dead:
            raise SessionLost(self._lost(session, "died earlier"))
        try:
            return ray.get(ref)
        except RayActorError as e:
            self._dead.add(index)
            raise SessionLost(self._lost(session, _cause(e))) from e

    @staticmethod
    def _lost(session: RemoteSession, cause: str) -> str:
        return (f"session {session.id!r} is lost: its actor (host {session.where.get('host')}, pid "
                f"{session.where.get('pid')}) died ({cause}); open a new session")

    def shutdown(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
        self._actors, self._sessions = [], {}
        if self._started and ray.is_initialized():
            ray.shutdown()


def _loopback_only() -> None:
    """Keep a local cluster on 127.0.0.1. On Linux Ray turns a loopback ``_node_ip_address`` into the
    machine's routable address (so other nodes could join); its single-node switch is this constant,
    read at call time, and the environment variable its subprocesses read."""
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _cause(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
