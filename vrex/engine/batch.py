"""Many live streams on one machine: one engine steps B streams together (issue 20).

Each stream is an ordinary ``StreamingSession`` (its own ``VrexCache``, KV tiers, policy and ReSV
tables; policies may differ per stream). What the engine adds is *where the model runs*: every
session sees a thin view of the model whose ``lm(...)`` and ``encode_frames(...)`` do not compute
but hand the call to the engine's scheduler. The scheduler runs the sessions' steps as greenlets
(cooperative, one OS thread: deterministic, no extra OpenMP teams on a small CPU) until each is
either done or waiting on the model, then serves all waiting calls at once:

* frames to encode: one encoder batch;
* LM steps of equal length (frame steps; decode tokens of streams that speak at the same time):
  one forward over ``[B, T, d]`` with per-row position ids and a ``BatchedCache``, so the dense
  layers read their weights once per step while attention stays per stream;
* anything else (a question's prompt of its own length): per stream.

So the LIVE loop itself (gate, narration, questions, position re-indexing) is the session's own
code, unchanged; a batched stream computes what it computes alone (the tests hold the greedy
outputs identical, ``full`` and ``resv``, streams of different lengths).

Streams join (``add_stream``) and leave (``remove_stream``) between steps. ``step`` takes a frame
for any subset of the streams: a stream whose source stalled is simply not in it (``run_sources``
does that from live sources). One device-tier budget is shared fairly: each live stream owns an
equal part (``device_share_bytes``), split again whenever a stream joins or leaves (a stream that
gives room moves its oldest device blocks to its host tier at once), and each stream's policy
decides what it reads from where.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

import torch
from greenlet import greenlet
from PIL import Image

from vrex.engine.batch_cache import BatchedCache
from vrex.engine.session import Event, SessionConfig, StreamingSession
from vrex.kv.cache import VrexCache
from vrex.kv.policy import KVPolicy
from vrex.models.videollm import VideoLLM

T = TypeVar("T")


class StreamStepError(RuntimeError):
    """Some streams' steps raised; ``errors`` maps stream id -> exception, ``results`` holds the
    other streams' results (their steps completed)."""

    def __init__(self, errors: dict[str, BaseException], results: dict[str, Any]):
        names = ", ".join(f"{sid}: {type(e).__name__}: {e}" for sid, e in errors.items())
        super().__init__(f"{len(errors)} stream(s) failed in this step ({names})")
        self.errors, self.results = errors, results


@dataclass
class _Call:
    kind: str  # "lm" | "encode"
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


_START = object()  # first switch into a task: no value to send


class _Task(greenlet):
    """A stream's step, run by the scheduler; model calls inside it yield to the scheduler."""


def _in_task() -> bool:
    return isinstance(greenlet.getcurrent(), _Task)


class _LMView:
    """What a session sees as ``model.lm``: the real LM for everything but the call itself."""

    def __init__(self, lm: torch.nn.Module):
        self._lm = lm

    def __getattr__(self, name: str):
        return getattr(self._lm, name)

    def __call__(self, *args, **kwargs):
        if not _in_task():
            return self._lm(*args, **kwargs)
        return greenlet.getcurrent().parent.switch(_Call("lm", args, kwargs))


class _ModelView:
    """What a session sees as its model: the shared ``VideoLLM`` with ``lm`` and ``encode_frames``
    routed through the engine."""

    def __init__(self, model: VideoLLM):
        self._model = model
        self.lm = _LMView(model.lm)

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def encode_frames(self, images: list[Image.Image]) -> torch.Tensor:
        if not _in_task():
            return self._model.encode_frames(images)
        return greenlet.getcurrent().parent.switch(_Call("encode", (list(images),)))


def _batch_key(call: _Call):
    """LM calls that can share one forward: one row each, same length and dtype, same extra options."""
    kw = call.kwargs
    embeds, cache = kw.get("inputs_embeds"), kw.get("vrex_cache")
    if call.args or embeds is None or embeds.shape[0] != 1 or not isinstance(cache, VrexCache) \
            or kw.get("past_key_values") is not cache or kw.get("position_ids") is None:
        return None
    rest = tuple(sorted((k, v) for k, v in kw.items()
                        if k not in ("inputs_embeds", "position_ids", "past_key_values", "vrex_cache")))
    try:
        hash(rest)
    except TypeError:
        return None
    return embeds.shape[1], embeds.dtype, rest


class BatchEngine:
    """B live streams over one model; their model work is batched step by step.

    >>> engine = BatchEngine(model)                                    # doctest: +SKIP
    >>> engine.add_stream("cam1", make_policy("resv")); engine.add_stream("cam2", make_policy("full"))
    >>> events = engine.step({"cam1": (0.5, image1), "cam2": (0.5, image2)})   # {"cam1": [...], "cam2": [...]}

    ``device_budget_bytes``: one device-tier budget for all streams; each live stream gets an equal
    share as its own device budget, split again when streams join or leave (the rest of a stream's KV
    goes to host or disk per its config). None: each stream's own config decides.
    """

    def __init__(self, model: VideoLLM, *, device_budget_bytes: int | None = None, max_streams: int = 8):
        if max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {max_streams}")
        if device_budget_bytes is not None and device_budget_bytes <= 0:
            raise ValueError(f"device_budget_bytes must be > 0 or None, got {device_budget_bytes}")
        self.model, self.max_streams, self.device_budget_bytes = model, max_streams, device_budget_bytes
        self._view = _ModelView(model)
        self.streams: dict[str, StreamingSession] = {}
        #: model work done: forwards run, how many rows each had, encoder batches
        self.counters = {"lm_forwards": 0, "lm_rows": 0, "encode_batches": 0, "encode_images": 0}

    # -- streams ------------------------------------------------------------------------------
    @property
    def device_share_bytes(self) -> int | None:
        """Each live stream's part of the shared device budget (the whole budget while none runs)."""
        return None if self.device_budget_bytes is None else self.device_budget_bytes // max(1, len(self.streams))

    def _share(self) -> None:
        """Split the budget again over the live streams: every stream's device tier gets the new share."""
        if self.device_budget_bytes is not None:
            for session in self.streams.values():
                session.store.set_device_budget(self.device_share_bytes)

    def add_stream(self, sid: str, policy: KVPolicy, config: SessionConfig | None = None, trace=None) -> StreamingSession:
        """Start a stream (its system prompt is prefilled now, on its own)."""
        if sid in self.streams:
            raise ValueError(f"stream {sid!r} already exists")
        if len(self.streams) >= self.max_streams:
            raise ValueError(f"the engine holds at most {self.max_streams} streams (max_streams); {sid!r} refused")
        config = config or SessionConfig()
        if self.device_budget_bytes is not None:  # its share once it has joined
            config = replace(config, device_budget_bytes=self.device_budget_bytes // (len(self.streams) + 1))
        session = StreamingSession(self._view, policy, config, trace=trace)  # type: ignore[arg-type]
        self.streams[sid] = session
        self._share()
        return session

    def attach(self, sid: str, session: StreamingSession) -> StreamingSession:
        """Take over an existing session (e.g. a ``fork`` of a filled one) as stream ``sid``: from now
        on its model work runs through this engine, and its device tier takes its share of the budget."""
        if sid in self.streams:
            raise ValueError(f"stream {sid!r} already exists")
        if len(self.streams) >= self.max_streams:
            raise ValueError(f"the engine holds at most {self.max_streams} streams (max_streams); {sid!r} refused")
        if getattr(session.model, "_model", session.model) is not self.model:
            raise ValueError(f"stream {sid!r}: the session runs another model than this engine's")
        session.model = self._view  # type: ignore[assignment]
        self.streams[sid] = session
        self._share()
        return session

    def remove_stream(self, sid: str) -> StreamingSession:
        """Stop a stream; returns its session (its store is closed)."""
        session = self._get(sid)
        del self.streams[sid]
        session.store.close()
        self._share()  # the others get its part
        return session

    def _get(self, sid: str) -> StreamingSession:
        if sid not in self.streams:
            raise KeyError(f"no stream {sid!r} (streams: {sorted(self.streams)})")
        return self.streams[sid]

    # -- stepping -----------------------------------------------------------------------------
    def step(self, frames: Mapping[str, tuple[float, Image.Image]]) -> dict[str, list[Event]]:
        """One frame for each named stream (any subset), stepped together; returns each stream's
        events (frame stats carry ``stream`` and the memory accounting)."""
        out = self.run_each({sid: (lambda s, tf=tf: s.push_frame(*tf)) for sid, tf in frames.items()})
        share = self.device_share_bytes
        for sid, events in out.items():
            for event in events:
                event.stats["stream"] = sid
                if share is not None and event.kind == "frame":
                    event.stats["device_share_bytes"] = share
        return out

    def ask(self, questions: Mapping[str, str | tuple[str, float | None]]) -> dict[str, list[Event]]:
        """Questions to several streams at once (``{sid: text}`` or ``{sid: (text, t)}``), answered
        together where their steps have equal lengths (decode tokens)."""
        def call(q):
            text, t = (q, None) if isinstance(q, str) else q
            return lambda s: s.ask(text, t)
        return self.run_each({sid: call(q) for sid, q in questions.items()})

    def run_each(self, calls: Mapping[str, Callable[[StreamingSession], T]]) -> dict[str, T]:
        """Run ``calls[sid](session)`` for each named stream together, batching their model work.
        Raises ``StreamStepError`` (after every other stream finished) if some raised."""
        sessions = {sid: self._get(sid) for sid in calls}
        results: dict[str, Any] = {}
        errors: dict[str, BaseException] = {}
        waiting: dict[str, tuple[_Task, _Call]] = {}

        def advance(sid: str, task: _Task, value: Any = _START, exc: BaseException | None = None) -> None:
            try:
                if exc is not None:
                    got = task.throw(exc)
                else:
                    got = task.switch() if value is _START else task.switch(value)
            except Exception as e:  # noqa: BLE001 - one stream's failure never stops the others
                errors[sid] = e
                return
            if task.dead:
                results[sid] = got
            else:
                waiting[sid] = (task, got)

        # Grad mode is per thread, not per greenlet: interleaved no_grad blocks of the streams would
        # leave it off; the whole step runs without grad (as every session step does) and restores it.
        grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            self._drive(calls, sessions, advance, waiting)
        finally:
            torch.set_grad_enabled(grad)
        if errors:
            raise StreamStepError(errors, results)
        return results

    def _drive(self, calls, sessions, advance, waiting) -> None:
        here = greenlet.getcurrent()
        for sid, fn in calls.items():
            advance(sid, _Task(functools.partial(fn, sessions[sid]), parent=here))
        while waiting:
            batch = dict(waiting)
            waiting.clear()
            served = self._serve({sid: call for sid, (_, call) in batch.items()})
            for sid, (task, _) in batch.items():
                value = served[sid]
                if isinstance(value, BaseException):
                    advance(sid, task, exc=value)
                else:
                    advance(sid, task, value)

    def _serve(self, calls: dict[str, _Call]) -> dict[str, Any]:
        """Run every waiting model call: encodes as one batch, equal-length LM steps as one forward."""
        out: dict[str, Any] = {}
        encodes = {sid: c for sid, c in calls.items() if c.kind == "encode"}
        if encodes:
            images = [im for c in encodes.values() for im in c.args[0]]
            try:
                feats = self.model.encode_frames(images)
                self.counters["encode_batches"] += 1
                self.counters["encode_images"] += len(images)
                lo = 0
                for sid, c in encodes.items():
                    n = len(c.args[0])
                    out[sid] = feats[lo:lo + n]
                    lo += n
            except Exception as e:  # noqa: BLE001 - each caller sees the error
                out.update({sid: e for sid in encodes})
        groups: dict[Any, list[str]] = {}
        for sid, c in calls.items():
            if c.kind == "lm":
                key = _batch_key(c)
                groups.setdefault(key if key is not None else ("alone", sid), []).append(sid)
        for key, sids in groups.items():
            try:
                if len(sids) == 1 or key[0] == "alone":
                    for sid in sids:
                        c = calls[sid]
                        out[sid] = self.model.lm(*c.args, **c.kwargs)
                        self._count(1)
                else:
                    self._forward_batch(sids, calls, out)
            except Exception as e:  # noqa: BLE001
                out.update({sid: e for sid in sids if sid not in out})
        return out

    @torch.no_grad()
    def _forward_batch(self, sids: list[str], calls: dict[str, _Call], out: dict[str, Any]) -> None:
        kws = [calls[sid].kwargs for sid in sids]
        cache = BatchedCache([kw["vrex_cache"] for kw in kws])
        rest = {k: v for k, v in kws[0].items() if k not in ("inputs_embeds", "position_ids", "past_key_values", "vrex_cache")}
        result = self.model.lm(
            inputs_embeds=torch.cat([kw["inputs_embeds"] for kw in kws]),
            position_ids=torch.cat([kw["position_ids"].expand(1, -1) for kw in kws]),
            past_key_values=cache, vrex_cache=cache, **rest)
        self._count(len(sids))
        for b, sid in enumerate(sids):
            out[sid] = type(result)(logits=result.logits[b:b + 1])

    def _count(self, rows: int) -> None:
        self.counters["lm_forwards"] += 1
        self.counters["lm_rows"] += rows

    # -- accounting -----------------------------------------------------------------------------
    def memory(self) -> dict[str, Any]:
        """Per-stream KV bytes per tier and their totals, with the shared budget and each share."""
        per = {sid: {k: v for k, v in s.memory().items() if k != "rss_bytes"} for sid, s in self.streams.items()}
        total = {k: sum(p[k] for p in per.values()) for k in ("kv_bytes", "device_bytes", "host_bytes", "disk_bytes")}
        return {"streams": per, "total": total, "device_budget_bytes": self.device_budget_bytes,
                "device_share_bytes": self.device_share_bytes}

    # -- live sources ---------------------------------------------------------------------------
    def run_sources(self, sources: Mapping[str, Iterable[tuple[float, Image.Image]]], *, poll_s: float = 0.05,
                    buffer: int = 4) -> Iterator[tuple[str, Event]]:
        """Drive existing streams from live sources (each read by its own thread); each step takes
        the oldest ready frame of every stream that has one, so a stalled source holds no one back.
        Yields ``(stream id, event)``; ends when every source has ended."""
        for sid in sources:
            self._get(sid)
        ready: dict[str, queue.Queue] = {sid: queue.Queue(maxsize=buffer) for sid in sources}
        wake = threading.Event()
        done = object()

        def read(sid: str, src: Iterable) -> None:
            try:
                for item in src:
                    ready[sid].put(item)
                    wake.set()
            finally:
                ready[sid].put(done)
                wake.set()

        threads = [threading.Thread(target=read, args=(sid, src), daemon=True, name=f"vrex-src-{sid}")
                   for sid, src in sources.items()]
        for th in threads:
            th.start()
        live = set(sources)
        while live:
            frames = {}
            for sid in sorted(live):
                try:
                    item = ready[sid].get_nowait()
                except queue.Empty:
                    continue
                if item is done:
                    live.discard(sid)
                else:
                    frames[sid] = item
            if not frames:
                if live:
                    wake.wait(poll_s)
                    wake.clear()
                continue
            for sid, events in self.step(frames).items():
                for event in events:
                    yield sid, event


def timed_step(engine: BatchEngine, frames: Mapping[str, tuple[float, Image.Image]]) -> tuple[dict[str, list[Event]], float]:
    """``engine.step`` and its wall time in seconds (benchmarks)."""
    t0 = time.perf_counter()
    out = engine.step(frames)
    return out, time.perf_counter() - t0
