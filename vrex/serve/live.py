"""One served stream: a ``StreamingSession`` plus its input slot, questions, events and timelines.

Threading: clients (HTTP handlers, WebSockets, source threads) only call ``offer_frame``, ``ask``
and the readers; the single worker thread (``vrex.serve.worker``) calls ``step``. The input slot
holds one frame: a frame that arrives while the previous one still waits replaces it and is
counted as dropped, so a slow machine never builds up lag behind a live source.
"""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

from PIL import Image

from vrex.engine.durable import open_manifest
from vrex.engine.persist import SessionError
from vrex.engine.session import SessionConfig, StreamingSession
from vrex.kv.layers import model_geometry
from vrex.kv.policies import make_policy
from vrex.serve.limits import ClientError, ServeLimits
from vrex.serve.saved import SessionsDir, Sidecar, frame_line, replay_frames
from vrex.serve.timeline import ReadRecorder, ReadTimeline, per_layer, summarize

MAX_EVENTS = 2000  # events kept for polling clients (older ones are dropped from the log)
MAX_LATENCIES = 4000


@dataclass
class SessionSettings:
    policy: str = "full"
    fps: float = 2.0
    theta: float = 0.725
    min_response_gap: float = 0.0
    recent_tokens: int | None = None

    def describe(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Pending:
    t: float
    image: Image.Image
    received: float


class Question(NamedTuple):
    id: str
    text: str
    asked: float  # time.monotonic() when asked


@dataclass
class Counters:
    received: int = 0
    processed: int = 0
    dropped_behind: int = 0  # replaced in the slot before the worker got to it
    dropped_rate: int = 0  # arrived faster than the session's fps
    narrations: int = 0
    answers: int = 0
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=MAX_LATENCIES))  # arrival -> processed


class LiveSession:
    def __init__(self, model: Any, policy: Any, settings: SessionSettings, limits: ServeLimits,
                 saved: SessionsDir | None = None):
        """A new session; with ``saved`` (``--sessions-dir``) it is saved there at once and after every step."""
        recorder = ReadRecorder(policy)
        config = SessionConfig(theta=settings.theta, min_response_gap=settings.min_response_gap, recent_tokens=settings.recent_tokens)
        self._setup(uuid.uuid4().hex[:12], settings, limits, recorder, StreamingSession(model, recorder, config))
        if saved is not None:
            directory = saved.path(self.id)
            self.session.save(directory, {"serve": settings.describe()})  # raises SessionSaveError (OSError)
            self.sidecar = Sidecar(directory)

    @classmethod
    def resume(cls, model: Any, sid: str, saved: SessionsDir, limits: ServeLimits) -> "LiveSession":
        """The session saved as ``saved/sid``, at its last save (a ``resume`` event says where); ClientError
        409 naming the directory when it cannot resume (damaged, another model, at its frame limit)."""
        directory = saved.path(sid)
        try:
            settings = saved_settings(directory)
            recorder = ReadRecorder(make_policy(settings.policy))
            session = StreamingSession.load(directory, model, policy=recorder)
        except (SessionError, KeyError, TypeError, ValueError) as e:  # SessionError is a ValueError
            raise cannot_resume(sid, directory, e) from None
        return cls.restore(sid, settings, limits, recorder, session, directory)

    @classmethod
    def around(cls, sid: str, session: Any, settings: SessionSettings, limits: ServeLimits,
               directory: Path | None = None) -> "LiveSession":
        """A session whose model steps run elsewhere (``vrex.serve.cluster``: on a Ray actor): ``session``
        has ``StreamingSession``'s counts and steps, but no cache here, so its answers have no timelines."""
        self = cls.__new__(cls)
        self._setup(sid, settings, limits, None, session)
        self.sidecar = Sidecar(directory) if directory is not None else None
        return self

    @classmethod
    def restore(cls, sid: str, settings: SessionSettings, limits: ServeLimits, recorder: ReadRecorder | None,
                session: Any, directory: Path) -> "LiveSession":
        """A session loaded from ``directory`` (here, or on a Ray actor), with what the server saved beside
        it (``serve.jsonl``: frame times, thumbnails, counters, event numbers) and what it said."""
        sidecar = Sidecar(directory)
        try:
            # Stepped on a Ray actor (no recorder here), the last saved step may have no line: see replay_frames.
            times, thumbs, counts = replay_frames(sidecar.read(), session.frames, session.t if recorder is None else None)
        except (KeyError, TypeError, ValueError) as e:
            raise cannot_resume(sid, directory, e) from None
        if session.frames >= limits.max_session_frames:
            raise ClientError(409, f"session {sid} reached the limit of {limits.max_session_frames} frames; it cannot go on")
        self = cls.__new__(cls)
        self._setup(sid, settings, limits, recorder, session)
        self.sidecar, self.frame_times, self.thumbs = sidecar, times, thumbs
        c = self.counters
        c.received, c.processed = counts.get("received", session.frames), session.frames
        c.dropped_behind, c.dropped_rate = counts.get("dropped_behind", 0), counts.get("dropped_rate", 0)
        c.narrations = sum(d["kind"] == "response" for d in session.dialogue)
        c.answers = sum(d["kind"] == "answer" for d in session.dialogue)
        self.seq = sidecar.seq_limit  # past every number handed out before the restart
        # The narrations and answers so far, for a page that comes back (``history``); what they read
        # is not saved, so their timelines are empty.
        for i, d in enumerate(session.dialogue):
            self.answers[f"saved{i}"] = {"id": f"saved{i}", "kind": d["kind"], "t": d["t"], "text": d["text"],
                                         "question": d.get("question"), "shares": None, "steps": 0}
        # The stream clock goes on from the saved time: frames without a time are stamped after it.
        self.created = self.last_active - session.t - 1.0 / settings.fps
        self._went_back()
        return self

    def restarted(self, where: dict[str, Any]) -> None:
        """Its session was rebuilt from its last save in place (a Ray actor that died, ``vrex.serve.cluster``;
        ``where``: ``frame``, ``t``): the server's record is cut back to that frame and it is live again."""
        n = where["frame"]
        with self._lock:
            del self.frame_times[n:]
            # A step the actor saved before it died, whose result never came back: its time is the save's.
            self.frame_times += [where["t"]] * (n - len(self.frame_times))
            for fid in [f for f in self.thumbs if f >= n]:
                del self.thumbs[fid]
            self.counters.processed = n
            self.state, self.error = "live", None
        self._went_back()

    def _went_back(self) -> None:
        """After a resume or restart: frames after the saved time are taken, a ``resume`` event says where."""
        s = self.session
        self._last_accepted_t = s.t if s.frames else float("-inf")
        self.resumed = {"t": round(s.t, 3), "frame": s.frames, "cached_tokens": s.cached_tokens}
        self.emit({"type": "resume", **self.resumed})

    def _setup(self, sid: str, settings: SessionSettings, limits: ServeLimits, recorder: ReadRecorder | None,
               session: StreamingSession) -> None:
        self.id = sid
        self.settings, self.limits = settings, limits
        self.created = self.last_active = time.monotonic()
        self.last_served = 0.0  # when the worker last stepped this session (its scheduling key)
        self.recorder = recorder
        self.session = session
        self.timeline: ReadTimeline | None = None  # what answers read; None: the session steps elsewhere
        if recorder is not None:
            geo = model_geometry(session.model.lm)  # GPT-NeoX configs have no num_key_value_heads
            self.timeline = ReadTimeline(self.recorder, self.session.cache.keep, geo.num_layers, geo.num_kv_heads)
            self.session.trace = lambda record, extra: self.timeline.on_step(record, self.session.spans)
            # The timeline needs the selections, not the policies' telemetry-only statistics (the cache
            # turns those on with a trace): keep them off the frame path.
            if hasattr(self.session.cache, "record_stats"):
                self.session.cache.record_stats = False
        self.state = "live"  # live | failed | closed
        self.error: str | None = None
        self.counters = Counters()
        self.frame_times: list[float] = []
        self.thumbs: dict[int, bytes] = {}
        self.answers: dict[str, dict[str, Any]] = {}  # id -> answer/narration with its timeline
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.last_stats: dict[str, Any] = {}
        self.seq = 0  # number of the last event
        self.sidecar: Sidecar | None = None  # set when the session is saved (--sessions-dir)
        self.resumed: dict[str, Any] | None = None  # where a resumed session started again
        self._lock = threading.Lock()
        self._slot: _Pending | None = None
        self._questions: deque[tuple[str, str, float]] = deque()
        self._subscribers: list[Callable[[dict[str, Any]], None]] = []
        self._last_accepted_t = float("-inf")
        self.source: Any = None  # a server-side source feeding this session (vrex.serve.sources)
        self.wake: Callable[[], None] = lambda: None
        self.on_close: Callable[[], None] = lambda: None  # frees what holds it elsewhere (a Ray actor's stream)

    # -- client side (any thread) -------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.created

    def offer_frame(self, image: Image.Image, t: float | None = None) -> bool:
        """Queue a frame (``t``: stream seconds, default: arrival time). False when it was dropped."""
        self._check_live()
        t = self.now() if t is None else float(t)
        with self._lock:
            self.last_active = time.monotonic()
            self.counters.received += 1
            if t < self._last_accepted_t:
                raise ClientError(422, f"frame time {t} s is before the previous frame's {self._last_accepted_t} s")
            # Rate: a frame closer than 1/fps to the previous accepted one is dropped (10% jitter allowed).
            if t - self._last_accepted_t < 0.9 / self.settings.fps:
                self.counters.dropped_rate += 1
                return False
            if self._slot is not None:
                self.counters.dropped_behind += 1
            self._slot = _Pending(t, image, time.monotonic())
            self._last_accepted_t = t
        self.wake()
        return True

    def ask(self, text: str) -> str:
        self._check_live()
        qid = uuid.uuid4().hex[:10]
        with self._lock:
            self.last_active = time.monotonic()
            self._questions.append((qid, text, time.monotonic()))
        self.emit({"type": "question", "id": qid, "text": text})
        self.wake()
        return qid

    def subscribe(self, callback: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)
        return unsubscribe

    def events_after(self, seq: int) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["seq"] > seq]

    def _check_live(self) -> None:
        if self.state != "live":
            raise ClientError(409, f"session {self.id} is {self.state}" + (f": {self.error}" if self.error else ""))

    # -- worker side ----------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.state == "live" and (self._slot is not None or (bool(self._questions) and self.session.frames > 0))

    def step(self) -> None:
        """One unit of work: a due question (once a frame is in), else the newest frame."""
        work = self.take()
        if isinstance(work, Question):
            self.answered(work, self.session.ask(work.text))
        elif work is not None:
            t = self.frame_time(work)
            self.pushed(work, t, self.session.push_frame(t, work.image))

    def take(self) -> "Question | _Pending | None":
        """The next unit of work, taken off the queue: a due question (once a frame is in), else the newest
        frame. The caller runs it and hands the events to ``answered`` / ``pushed`` (``vrex.serve.cluster``
        runs many sessions' steps at once)."""
        with self._lock:
            question = Question(*self._questions.popleft()) if self._questions and self.session.frames else None
            pending = None if question else self._slot
            if not question:
                self._slot = None
        return question or pending

    def frame_time(self, pending: _Pending) -> float:
        """The stream time ``pending`` is stepped at: never before the session's last frame."""
        return max(pending.t, self.session.t)

    def answered(self, question: "Question", events: list) -> None:
        for event in events:
            self._publish(event.to_dict(), qid=question.id, asked=question.asked)
        self._save(None)

    def pushed(self, pending: _Pending, t: float, events: list) -> None:
        """``pending`` was stepped at ``t`` with these events: thumbnail, counters, events published, saved."""
        image = pending.image
        fid = self.session.frames - 1
        self.frame_times.append(t)
        thumb = image.copy()
        thumb.thumbnail((self.limits.thumb_side, self.limits.thumb_side))
        buf = io.BytesIO()
        thumb.save(buf, "JPEG", quality=70)
        self.thumbs[fid] = buf.getvalue()
        latency = 1e3 * (time.monotonic() - pending.received)
        with self._lock:
            self.counters.processed += 1
            self.counters.latencies_ms.append(latency)
        for event in events:
            data = event.to_dict()
            if data["kind"] == "frame":
                data["stats"].update(latency_ms=latency, **self.counts())
                self.last_stats = data["stats"]
            self._publish(data)
        self._save(frame_line(fid, t, self.thumbs[fid], self.counts()))
        if self.session.frames >= self.limits.max_session_frames:
            self.close(f"reached the limit of {self.limits.max_session_frames} frames per session")

    def _publish(self, data: dict[str, Any], qid: str | None = None, asked: float | None = None) -> None:
        kind = data["kind"]
        if kind in ("response", "answer"):
            gens = self.timeline.take() if self.timeline is not None else []
            gen = gens[-1] if gens else None
            aid = qid or uuid.uuid4().hex[:10]
            data["id"] = aid
            if asked is not None:
                data["stats"]["answer_latency_ms"] = 1e3 * (time.monotonic() - asked)
            entry = {"id": aid, "kind": kind, "t": data["t"], "text": data["text"], "question": data["stats"].get("question"),
                     "shares": self.timeline.shares(gen).float() if gen else None, "steps": gen.steps if gen else 0}
            self.answers[aid] = entry
            data["timeline"] = self.timeline_json(aid)
            with self._lock:
                if kind == "answer":
                    self.counters.answers += 1
                else:
                    self.counters.narrations += 1
        data["stats"] = {k: v for k, v in data["stats"].items() if k != "token_ms"}
        self.emit({"type": kind, **data})

    def _save(self, line: dict[str, Any] | None) -> None:
        """After a step of a saved session: the server's line, then the session's own save (see
        ``vrex.serve.saved``). A failed save is reported and the stream goes on; the directory keeps
        the last good save and the next step's save tries again."""
        if self.sidecar is None:
            return
        try:
            if line is not None:
                self.sidecar.append(line)
            self.session.save()
        except OSError as e:  # SessionSaveError is an OSError
            self.emit({"type": "error", "fatal": False, "message": f"session {self.id} not saved: {e}"})

    def emit(self, message: dict[str, Any]) -> None:
        with self._lock:
            self.seq += 1
            message["seq"] = self.seq
            if self.sidecar is not None:
                try:
                    self.sidecar.reserve(self.seq)
                except OSError:
                    pass  # the step's save reports the disk; numbers may then repeat after a crash
            self.events.append(message)
            subscribers = list(self._subscribers)
        for callback in subscribers:
            callback(message)

    def fail(self, error: BaseException) -> None:
        """The model step raised: this session stops (its cache may be half-updated); others go on."""
        self.state, self.error = "failed", f"{type(error).__name__}: {error}"
        self.emit({"type": "error", "fatal": True, "message": f"session failed: {self.error}"})

    def close(self, reason: str = "closed") -> None:
        if self.state == "live":
            self.state = "closed"
            self.emit({"type": "closed", "reason": reason})
        if self.source is not None:
            self.source.stop()
        if self.sidecar is not None:
            self.sidecar.close()  # reopened by a save still under way; the session's log closes with it
        self.on_close()

    # -- readers ---------------------------------------------------------------------------------
    def history(self) -> dict[str, Any]:
        """What a page that comes back (a reload, a new tab) shows again: the narrations and answers
        so far, oldest first (each one's timeline from ``timeline_json``), the questions still waiting,
        the last frame's stats, and ``seq``: the events after it are not in here (the page takes them
        from its WebSocket, opened before it asks for the history, so nothing falls in between)."""
        with self._lock:
            seq, stats = self.seq, dict(self.last_stats)
            waiting = [{"id": qid, "text": text} for qid, text, _ in self._questions]
            entries = list(self.answers.values())
        items = [{"type": e["kind"], "id": e["id"], "t": e["t"], "text": e["text"], "question": e["question"],
                  "read_kept": e["shares"] is not None} for e in entries]
        return {"seq": seq, "items": items, "waiting": waiting, "stats": stats, "session": self.describe()}

    def counts(self) -> dict[str, int]:
        c = self.counters
        return {"received": c.received, "processed": c.processed, "dropped": c.dropped_behind + c.dropped_rate,
                "dropped_behind": c.dropped_behind, "dropped_rate": c.dropped_rate}

    def timeline_json(self, aid: str, layers: bool = False) -> dict[str, Any]:
        entry = self.answers.get(aid)
        if entry is None:
            raise ClientError(404, f"session {self.id} has no answer or narration {aid!r}")
        shares = entry["shares"]
        out: dict[str, Any] = {"id": aid, "kind": entry["kind"], "question": entry["question"], "text": entry["text"],
                               "t": entry["t"], "steps": entry["steps"], "policy": self.settings.policy,
                               **(summarize(shares, self.frame_times) if shares is not None else self._unread())}
        if layers and shares is not None:
            out["layers"] = per_layer(shares)
        return out

    def _unread(self) -> dict[str, Any]:
        """An empty timeline, and why (the page says it)."""
        why = ("it was read on a Ray actor (vrex serve --cluster), which does not send its reads back" if self.timeline is None
               else "it was said before the server restarted (a saved session keeps its words, not its reads)")
        return {"frames": [], "top": [], "unknown": why}

    def describe(self) -> dict[str, Any]:
        lat = sorted(self.counters.latencies_ms)
        pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 1)) if lat else (lambda q: None)
        return {"id": self.id, "state": self.state, "error": self.error, "settings": self.settings.describe(),
                "frames": self.session.frames, "t": round(self.session.t, 3), "cached_tokens": self.session.cached_tokens,
                "memory": {k: v for k, v in self.last_stats.items() if k.endswith("_bytes")}, "counters": self.counts(), "narrations": self.counters.narrations,
                "answers": self.counters.answers, "latency_ms": {"p50": pct(0.5), "p99": pct(0.99)},
                "source": self.source.describe() if self.source is not None else None,
                "saved_frames": self.session.saved_frames, "resumed": self.resumed,
                "uptime_s": round(self.now(), 1)}


def saved_settings(directory: Path) -> SessionSettings:
    """The serve settings of the session saved in ``directory`` (ValueError: not saved by ``vrex serve``)."""
    run = open_manifest(directory)["settings"]["run"]
    if "serve" not in run:
        raise ValueError("it holds a session saved by another program (vrex run?), not by vrex serve")
    return SessionSettings(**run["serve"])


def cannot_resume(sid: str, directory: Path, e: BaseException) -> ClientError:
    return ClientError(409, f"session {sid} cannot resume from {directory}: {e}")
