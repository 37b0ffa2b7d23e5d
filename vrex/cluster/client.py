"""``vrex.cluster``: live sessions as Ray actors, on one machine or many.

Each actor is one batched engine (``vrex.cluster.actor.EngineActor``: its own model copy and a
``BatchEngine``); Ray places actors on any node of the cluster. ``Cluster.open_session`` routes a
new session to the actor with the fewest sessions and returns a ``RemoteSession`` bound to it, so
every later call goes to that actor. ``Cluster.step`` sends each actor its sessions' frames in one
call (stepped as one batch there), all actors at once. An actor that dies (its process or node
lost) turns every later call of its sessions into ``SessionLost``, naming the session and where
it ran; the other actors' sessions go on.

With ``sessions_dir`` every session is a durable session (``vrex.engine.durable``, the format of
``vrex run --session``) in ``sessions_dir/<id>``, saved by its actor after each of its steps; then
``Cluster.restart(session)`` (or ``session.restart()``) starts a new actor in the dead one's place,
rebuilds the session there from its last save and says where it stands: the stream goes on from
that frame exactly as if nothing had happened (greedy decoding). ``Cluster.resume(id)`` does the
same for a session of an earlier driver (whose actors died with it). On several machines the directory
must be one every node sees at the same path (a shared file system): the new actor may run elsewhere.
"""

from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path
from typing import Any, Mapping

from PIL import Image

try:
    import ray
    from ray.exceptions import RayActorError, RayTaskError
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

    def __init__(self, cluster: "Cluster", sid: str, actor, where: dict[str, Any], index: int):
        self.cluster, self.id, self._actor, self.where = cluster, sid, actor, where
        self._index = index  # the actor slot it was placed in (a restarted actor takes the same slot)
        self.resumed: dict[str, Any] | None = None  # where a session from Cluster.resume stood when it came back

    def __repr__(self) -> str:
        return f"RemoteSession({self.id!r} on {self.where.get('host')} pid {self.where.get('pid')})"

    def push_frame(self, t: float, image: Image.Image) -> list[dict]:
        """Prefill one frame; the events it caused (``Event.to_dict()`` form)."""
        return self._one(self._actor.step.remote({self.id: (t, image)}))

    def ask(self, text: str, t: float | None = None) -> list[dict]:
        return self._one(self._actor.ask.remote({self.id: (text, t)}))

    def memory(self) -> dict[str, Any]:
        return self._get(self._actor.memory.remote())["streams"][self.id]

    def restart(self) -> dict[str, Any]:
        """``Cluster.restart(self)``: rebuild this session from its last save; where it stands."""
        return self.cluster.restart(self)

    def close(self, keep_saved: bool = False) -> None:
        """End the session; its saved directory is removed with it, unless ``keep_saved`` (the session
        set aside: ``cluster.resume(id)`` brings it back)."""
        try:
            remove = None if keep_saved else self.cluster._save_dir(self.id)
            self._get(self._actor.close.remote(self.id, remove))
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


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast when nothing answers at a Ray head's ``HOST:PORT`` (or ``ray://HOST:PORT``): ``ray.init``
    itself retries a wrong address for minutes before it gives up. ``"auto"`` is resolved by Ray from
    this machine's own files and is not checked here. Raises ``ValueError`` (not an address) or
    ``ConnectionError`` (nothing listening), naming the address."""
    if address == "auto":
        return
    hostport = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"Ray address {address!r}: give 'auto', HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"Ray address {address!r}: nothing answers on {host}:{port} ({e.strerror or e}); "
                              "start a head there with `ray start --head`, or check the address") from None


class Cluster:
    """Sessions on Ray actors. ``address``: None starts a local Ray bound to 127.0.0.1 (``num_cpus``
    CPUs); ``"auto"`` joins the cluster this machine belongs to (``ray start --head`` / ``--address``);
    ``"ray://HOST:10001"`` connects a client to a remote head. ``actors``: engine actors to spread
    sessions over, each with ``cpus_per_actor`` CPUs and ``threads`` torch threads. ``connector``:
    the model each actor loads (``load_videollm``'s argument). ``sessions_dir``: save every session
    there as it goes, so ``restart`` can bring back a session whose actor died (see the module docstring)."""

    def __init__(self, address: str | None = None, *, actors: int = 1, cpus_per_actor: float = 1,
                 threads: int | None = None, num_cpus: int | None = None, connector: str | None = "auto",
                 device_budget_bytes: int | None = None, max_streams: int = 8,
                 sessions_dir: str | os.PathLike | None = None):
        if actors < 1:
            raise ValueError(f"actors must be >= 1, got {actors}")
        self.sessions_dir = _sessions_dir(sessions_dir)
        self._started = False
        if not ray.is_initialized():
            if address is None:
                _loopback_only()
                ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                         log_to_driver=False, configure_logging=False)
            else:
                check_address(address)
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            self._started = True
        # max_restarts=0: a restart by Ray would bring the actor back empty; restart() brings back its sessions.
        self._remote = ray.remote(EngineActor).options(num_cpus=cpus_per_actor, max_restarts=0, scheduling_strategy="SPREAD")
        self._actor_options = {"threads": threads, "connector": connector, "device_budget_bytes": device_budget_bytes,
                               "max_streams": max_streams}
        self._actors = [self._remote.remote(**self._actor_options) for _ in range(actors)]
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

    def open_session(self, policy: str = "resv", sid: str | None = None, run_settings: dict | None = None,
                     **config) -> RemoteSession:
        """A new session (``policy``: any ``make_policy`` spec; ``config``: ``SessionConfig`` fields) on
        the live actor with the fewest sessions. ``run_settings``: kept in its save's manifest."""
        from vrex.engine.session import SessionConfig
        from vrex.kv.policies import make_policy

        if sid is None:  # the next free id (sessions_dir may hold an earlier driver's s0, s1...)
            sid = next(s for s in (f"s{i}" for i in self._ids) if s not in self._sessions and not self._is_saved(s))
        if sid in self._sessions:
            raise ValueError(f"session {sid!r} already exists")
        try:  # checked here, so a bad spec is one clear line rather than an actor's traceback
            make_policy(policy)
            SessionConfig(**config)
        except (ValueError, TypeError, SyntaxError) as e:
            raise ValueError(f"session {sid!r}: policy {policy!r} or config {config}: {e}") from None
        save_dir = self._save_dir(sid)
        if save_dir is not None and Path(save_dir).exists() and any(Path(save_dir).iterdir()):
            raise ValueError(f"session {sid!r}: {save_dir} already holds a saved session; cluster.resume({sid!r}) "
                             "continues it, or pick another id")
        index = self._least_loaded()
        actor = self._actors[index]
        try:
            where = ray.get(actor.open.remote(sid, policy, config, save_dir, run_settings))
        except RayActorError as e:
            self._dead.add(index)
            raise SessionLost(f"session {sid!r} could not start: its actor died ({_cause(e)})") from e
        except RayTaskError as e:
            raise SessionError(f"session {sid!r} could not start: {e.cause!r}") from None
        session = RemoteSession(self, sid, actor, where, index)
        self._sessions[sid] = session
        return session

    def resume(self, sid: str) -> RemoteSession:
        """A session saved in ``sessions_dir`` that this cluster does not hold (one of an earlier driver,
        whose actors died with it), rebuilt from its last save on the live actor with the fewest
        sessions; ``session.resumed`` says where it stands (as ``restart`` returns). Only one live
        copy of a session may save into its directory: resume a session once its old actor is gone."""
        if self.sessions_dir is None:
            raise SessionError(f"session {sid!r} cannot resume: this cluster does not save sessions (Cluster(sessions_dir=DIR) does)")
        if sid in self._sessions:
            raise ValueError(f"session {sid!r} is open in this cluster: cluster.restart(session) reloads it")
        if not self._is_saved(sid):
            raise ValueError(f"no saved session {sid!r} in {self.sessions_dir}")
        index = self._least_loaded()
        session = RemoteSession(self, sid, self._actors[index], {}, index)
        self._sessions[sid] = session
        try:
            session.resumed = self.restart(session)
        except BaseException:
            del self._sessions[sid]
            raise
        return session

    def restart(self, session: RemoteSession) -> dict[str, Any]:
        """Bring ``session`` back from its last save (needs ``sessions_dir``): if its actor died, a new
        actor takes its place (once: the dead actor's other sessions restart there too); a session
        whose actor lives (its last step raised) is reloaded there. The same ``RemoteSession`` goes on
        working; returns where it stands: ``frame`` (frames it holds), ``t`` (the last one's time),
        ``cached_tokens``. Send the frames after ``t``."""
        if self.sessions_dir is None:
            raise SessionError(f"session {session.id!r} cannot restart: this cluster does not save sessions "
                               "(Cluster(sessions_dir=DIR) does)")
        if self._sessions.get(session.id) is not session:
            raise ValueError(f"{session!r} is not a session of this cluster")
        i = session._index
        for attempt in range(2):  # a second try when the actor turns out dead only now
            if i in self._dead:
                self._actors[i] = self._remote.remote(**self._actor_options)
                self._dead.discard(i)
            actor = self._actors[i]
            try:
                info = ray.get(actor.resume.remote(session.id, self._save_dir(session.id)))
                break
            except RayActorError as e:
                self._dead.add(i)
                if attempt:
                    raise SessionLost(f"session {session.id!r} could not restart: its new actor died ({_cause(e)})") from e
            except RayTaskError as e:  # the saved directory cannot be loaded (damaged, another model...)
                raise SessionError(f"session {session.id!r} cannot restart from {self._save_dir(session.id)}: {e.cause}") from None
        session._actor = actor
        session.where = {k: info[k] for k in ("id", "host", "pid", "streams")}
        return {k: info[k] for k in ("frame", "t", "cached_tokens")}

    def _least_loaded(self) -> int:
        load = {i: 0 for i in range(len(self._actors)) if i not in self._dead}
        if not load:
            raise SessionLost("every actor of this cluster has died; start a new Cluster")
        for s in self._sessions.values():
            if s._index in load and self._current(s):
                load[s._index] += 1
        return min(load, key=lambda i: (load[i], i))

    def _is_saved(self, sid: str) -> bool:
        return self.sessions_dir is not None and os.path.exists(os.path.join(self.sessions_dir, sid, "manifest.json"))

    def _save_dir(self, sid: str) -> str | None:
        return None if self.sessions_dir is None else os.path.join(self.sessions_dir, sid)

    def _current(self, session: RemoteSession) -> bool:
        """The session's actor is the one in its slot and not known dead."""
        return self._actors[session._index] is session._actor and session._index not in self._dead

    def step(self, frames: Mapping[RemoteSession, tuple[float, Image.Image]]) -> dict[RemoteSession, list[dict]]:
        """A frame for each given session: one batched call per actor, all actors in parallel."""
        by_actor: dict[int, list[RemoteSession]] = {}
        results, errors = {}, {}
        for session in frames:
            if self._current(session):
                by_actor.setdefault(session._index, []).append(session)
            else:
                errors[session] = SessionLost(self._lost(session, "died earlier"))
        refs = {i: self._actors[i].step.remote({s.id: frames[s] for s in members}) for i, members in by_actor.items()}
        for i, ref in refs.items():
            members = by_actor[i]
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
        if not self._current(session):
            raise SessionLost(self._lost(session, "died earlier"))
        try:
            return ray.get(ref)
        except RayActorError as e:
            self._dead.add(session._index)
            raise SessionLost(self._lost(session, _cause(e))) from e

    def _lost(self, session: RemoteSession, cause: str) -> str:
        then = ("cluster.restart(session) brings it back from its last save" if self.sessions_dir is not None
                else "open a new session (Cluster(sessions_dir=DIR) would let it restart)")
        return (f"session {session.id!r} is lost: its actor (host {session.where.get('host')}, pid "
                f"{session.where.get('pid')}) died ({cause}); {then}")

    def shutdown(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
        self._actors, self._sessions = [], {}
        if self._started and ray.is_initialized():
            ray.shutdown()


def _sessions_dir(path: str | os.PathLike | None) -> str | None:
    """An absolute, writable directory (actors may run in another working directory), or None."""
    if path is None:
        return None
    p = Path(path).expanduser().resolve()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"sessions_dir {str(path)!r}: cannot create it ({e.strerror or e})") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"sessions_dir {str(path)!r} is not writable")
    return str(p)


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
