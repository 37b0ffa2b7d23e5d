"""The LIVE loop: one iterative-prefill step per frame, the streaming-EOS gate, questions at any time.

Per frame (VideoLLM-online, ``demo/inference.py``): the text owed from the previous step (the
interval token after a silent frame, or the text that resumes the stream after a reply) and the
frame's visual tokens are prefilled together into the KV cache. Then, unless a question is due,
the gate reads P(interval) at the frame's last token: at or above ``theta`` the model stays
silent; below it the model speaks, i.e. decodes a narration. Questions are answered after the
frame at or past their timestamp. Who speaks (the question queue, the gate, the next token) is
decided in ``vrex.engine.turns``; what the stream is (positions, spans, pending text) lives in
``vrex.engine.stream_state``; this module runs the steps.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import psutil
import torch
from PIL import Image

import vrex.kv.attention  # noqa: F401  (registers the "vrex" attention implementation)
from vrex.engine.config import DEFAULT_RECENT_FRAMES, DEFAULT_THETA, SessionConfig, recent_window  # noqa: F401  (re-exported)
from vrex.engine.heap import fix_mmap_threshold, release_free_heap
from vrex.engine.persist import crash_point
from vrex.engine.positions import compressed_positions
from vrex.engine.stream_state import StreamState
from vrex.engine.turns import QuestionQueue, gate_opens, interval_probability, late_answer_note, next_token
from vrex.kv.cache import KeepConfig, StepRecord, VrexCache
from vrex.kv.layers import Geometry, layer_specs, model_geometry, rerotate, rotation, text_config
from vrex.kv.policy import KVPolicy, Stage
from vrex.kv.store import KVStore
from vrex.kv.telemetry import selection_summary
from vrex.models.videollm import VideoLLM

EventKind = Literal["frame", "response", "answer"]


@dataclass
class Event:
    t: float
    kind: EventKind
    text: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"t": round(self.t, 3), "kind": self.kind, "text": self.text, "stats": self.stats}


class StreamingSession:
    """One live stream through a ``VideoLLM`` with a KV selection policy.

    >>> session = StreamingSession(model, policy)          # doctest: +SKIP
    >>> events = session.push_frame(0.5, image)            # [] or [Event(kind="response"), ...]
    >>> events = session.ask("What is shown?", t=3.0)      # answered when a frame at >= 3.0 s arrives
    """

    def __init__(self, model: VideoLLM, policy: KVPolicy, config: SessionConfig | None = None, trace=None):
        self._build(model, policy, config, trace)
        # The system prompt is the sink: always attended, never evicted.
        self._forward(model.embed_text(model.tokenize(model.fmt.prefix)), "text")
        self.state.sink_tokens = self.cache.keep.sink_tokens = self.cached_tokens

    def _build(self, model: VideoLLM, policy: KVPolicy, config: SessionConfig | None, trace) -> None:
        """Everything but the stream: store, cache, token ids, sampling, an empty stream state."""
        fix_mmap_threshold()  # big temporaries get their own mappings, returned when freed (vrex.engine.heap)
        self.model, self.policy = model, policy
        self.config = config or SessionConfig()
        self._trace = trace  # optional telemetry sink: callable(StepRecord, dict) -> None
        self.last_record: StepRecord | None = None
        self._reindex_ms = 0.0  # time the current step spent re-indexing positions (a frame's stats)
        self._reindex_per_step = 1  # layers a spread re-index moves per step (PositionConfig.spread)
        lm = model.lm
        lm.set_attn_implementation("vrex")
        # transformers' causal LMs compute the LM head for the last rows only when asked (logits_to_keep)
        self._keeps_logits = "logits_to_keep" in inspect.signature(lm.forward).parameters
        cfg = text_config(lm.config)
        geometry = model_geometry(lm)
        # KV type by default: float32 on CPU whatever the LM's type (the attention runs in float32 there, and a
        # bf16 store made full attention convert the whole cache every layer), the LM's type elsewhere.
        kv_default = torch.float32 if lm.device.type == "cpu" else lm.dtype
        self.store = _make_store(geometry, kv_default, lm.device, policy, self.config)
        self.cache = VrexCache(self.store, policy, KeepConfig(recent_tokens=recent_window(self.config, model.tokens_per_frame)),
                               num_q_heads=geometry.num_q_heads, kernels=self.config.kernels, layers=layer_specs(lm))
        self.cache.record_stats = trace is not None
        self.max_position = self.config.positions.max_position or cfg.max_position_embeddings
        fmt = model.fmt
        self.interval_id = model.token_id(fmt.interval)
        self.stop_ids = {model.token_id(fmt.stop)}
        if model.tokenizer.eos_token_id is not None:
            self.stop_ids.add(model.tokenizer.eos_token_id)
        self._rng = torch.Generator().manual_seed(self.config.seed)
        self.state = StreamState(pending=torch.empty(0, dtype=torch.long, device=model.device))
        self._durable = None  # vrex.engine.durable.Durable once saved to / loaded from a directory

    # The stream state (vrex.engine.stream_state) under the names the live loop has always used.
    positions = property(lambda self: self.state.positions, lambda self, v: setattr(self.state, "positions", v))
    spans = property(lambda self: self.state.spans, lambda self, v: setattr(self.state, "spans", v))
    frames = property(lambda self: self.state.frames, lambda self, v: setattr(self.state, "frames", v))
    t = property(lambda self: self.state.t, lambda self, v: setattr(self.state, "t", v))
    _pending = property(lambda self: self.state.pending, lambda self, v: setattr(self.state, "pending", v))
    _last_features = property(lambda self: self.state.last_features, lambda self, v: setattr(self.state, "last_features", v))
    _last_response_t = property(lambda self: self.state.last_response_t, lambda self, v: setattr(self.state, "last_response_t", v))

    # -- public API ------------------------------------------------------------------------
    @property
    def trace(self):
        """Telemetry sink ``callable(StepRecord, dict)`` or None; policies build their telemetry-only
        statistics only while one is set."""
        return self._trace

    @trace.setter
    def trace(self, sink) -> None:
        self._trace = sink
        self.cache.record_stats = sink is not None

    @property
    def cached_tokens(self) -> int:
        return int(self.positions.numel())

    @property
    def questions(self) -> QuestionQueue:
        """The questions not yet answered (kept in the stream state, so saves and forks carry them)."""
        return QuestionQueue(self.state)

    def ask(self, text: str, t: float | None = None) -> list[Event]:
        """Queue a question for time ``t`` (default: now). Answered at once if ``t`` is not in the future."""
        t = self.questions.add(text, self.t if t is None else t)
        return self._answer_due() if self.frames and t <= self.t else []

    def push_frame(self, t: float, image: Image.Image) -> list[Event]:
        """Prefill one frame; return the events it caused (frame stats, maybe a response or answers)."""
        if self.frames and t < self.t:
            raise ValueError(f"frame time {t} s is before the previous frame's {self.t} s: frames must arrive in time order")
        t0 = time.perf_counter()
        features = self.model.encode_frames([image])
        frame_embeds = self.model.connect(features, self._last_features)[0]
        self._last_features = features[0]
        t_vision = time.perf_counter()
        embeds = torch.cat([self.model.embed_text(self._pending), frame_embeds], dim=0)
        self._pending = self._pending[:0]
        self._reindex_ms = 0.0
        logits, record = self._forward(embeds, "frame", frame_id=self.frames)
        t_prefill = time.perf_counter()
        self.frames += 1
        self.t = float(t)
        self.last_logits = logits[-1]
        p_interval = interval_probability(logits[-1], self.interval_id)
        stats = {
            "frame": self.frames - 1, "vision_ms": 1e3 * (t_vision - t0), "prefill_ms": 1e3 * (t_prefill - t_vision),
            "total_ms": 1e3 * (t_prefill - t0), "reindex_ms": self._reindex_ms, "cached_tokens": self.cached_tokens, "p_interval": p_interval,
            **self.memory(), **selection_summary(record),
        }
        events = [Event(self.t, "frame", "", stats)]
        answers = self._answer_due()
        if answers:
            events += answers
        elif gate_opens(p_interval, self.t, self._last_response_t, self.config):
            text, gen_stats = self._generate(self.model.fmt.respond, self.config.max_response_tokens)
            events.append(Event(self.t, "response", text, gen_stats))
            self.state.dialogue.append({"t": self.t, "kind": "response", "text": text})
            self._last_response_t = self.t
        else:
            self._pending = torch.tensor([self.interval_id], device=self.model.device)
        release_free_heap()  # at most every 30 s: the allocator's free pages back to the system (vrex.engine.heap)
        return events

    def fast_forward(self, times: list[float], frame_features: torch.Tensor, chunk: int = 32) -> None:
        """Prefill many silent frames (``frame_features`` [N, tokens, d_vis], already encoded, e.g. with
        ``model.encode_frames``) in chunks of ``chunk`` frames per forward, in the exact LIVE layout.
        For building long contexts fast (benchmarks, evaluation haystacks): no gate, no events;
        policies index each frame separately but select once per chunk."""
        if len(times) != len(frame_features):
            raise ValueError(f"fast_forward got {len(times)} times for {len(frame_features)} frames")
        if not len(times):
            return
        if self.frames and times[0] < self.t:
            raise ValueError(f"frame time {times[0]} s is before the previous frame's {self.t} s: frames must arrive in time order")
        frame_embeds = self.model.connect(frame_features, self._last_features)
        self._last_features = frame_features[-1].to(self.model.device)
        interval = self.model.embed_text(torch.tensor([self.interval_id], device=self.model.device))
        for lo in range(0, len(times), chunk):
            parts, spans = [], []
            for i in range(lo, min(lo + chunk, len(times))):
                pending = self.model.embed_text(self._pending) if self._pending.numel() else interval[:0]
                self._pending = torch.tensor([self.interval_id], device=self.model.device)
                parts += [pending, frame_embeds[i]]
                spans.append((pending.shape[0] + frame_embeds[i].shape[0], self.frames))
                self.frames += 1
                self.t = float(times[i])
            self._forward(torch.cat(parts), "frame", frame_spans=spans)
            release_free_heap()

    def fork(self, policy: KVPolicy, config: SessionConfig | None = None) -> "StreamingSession":
        """A new session at this exact stream state with another policy/config: same cached K/V (copied
        into a new store, so tiers follow the new config), positions and pending text; the new policy
        indexes the cached tokens frame by frame, as it would have while streaming. Benchmarks use it
        to compare policies from one shared fill."""
        specs = getattr(self.cache, "specs", None)
        if any(bool(self.store.layers[layer].is_evicted().any()) for layer in range(self.store.num_layers)
               if specs is None or not specs[layer].sliding):  # sliding layers drop what falls out of their window
            raise ValueError("fork needs a session whose policy keeps every token (e.g. full); this one evicted tokens")
        store, cache = self.store, self.cache
        # a layer still in the old frame of a spread re-index is copied at the stream's positions
        return StreamingSession.from_state(self.model, policy, config or self.config, self.state,
                                           lambda layer: (cache.current_keys(layer), store.layers[layer].values(), None))

    @classmethod
    def from_state(cls, model: VideoLLM, policy: KVPolicy, config: SessionConfig | None, state: StreamState,
                   kv: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], *,
                   policy_state: dict[str, Any] | None = None, trace=None) -> "StreamingSession":
        """A session at ``state`` (copied) whose store holds ``kv(layer) -> (keys, values, evicted)``,
        ``[H_kv, N, D]`` in arrival order (``evicted``: bool ``[N]`` or None), one block per span.

        Without ``policy_state`` the policy indexes every block as it would have while streaming (how
        ``fork`` changes policy): at the positions the block was stored at (``state.stored_at``), then,
        where re-indexing has moved them since, it re-derives its index at the positions they have now,
        as the streaming policy did at each re-index. (Indexed at the re-indexed positions instead, old
        tokens squeezed into few positions rotate alike: a ReSV fork at 45K tokens made 229 clusters per
        KV head where it now makes 790, and its frame steps took 204 ms where they now take 255, closer
        to the 277 of the same stream run live; scripts, 2 cores.) Between two re-indexes the live
        policy clustered new blocks against codes rebuilt at the last one; here they meet the codes of
        their arrival, so after the first re-index the two tables agree closely, not exactly.

        With ``policy_state`` (``policy.state_dict()`` of the same policy) the policy is restored as
        saved and the blocks are only stored, in its cluster order."""
        new = cls.__new__(cls)
        new._build(model, policy, config, trace)
        new.state = state.clone()
        new.cache.keep.sink_tokens = state.sink_tokens
        if policy_state is not None:
            policy.load_state_dict(policy_state)
        specs = getattr(new.cache, "specs", None)
        order_of = getattr(policy, "block_order", None)
        if state.stored_at.shape != state.positions.shape:
            raise ValueError(f"stream state: {state.stored_at.numel()} stored-at positions for {state.positions.numel()} tokens")
        moved = state.stored_at - state.positions  # per token: where it arrived - where it is now
        back = {}  # the rotation by ``moved``, per distinct RoPE: layers with one RoPE share it
        for layer in range(new.store.num_layers):
            keys, values, evicted = kv(layer)
            sliding = specs is not None and specs[layer].sliding
            arrived = keys
            if policy_state is None and not sliding and bool(moved.any()):
                spec = new.cache.specs[layer]
                if spec.rope_key not in back:
                    back[spec.rope_key] = rotation(moved, spec.inv_freq, spec.rope_layout)
                arrived = rerotate(keys, moved, spec.inv_freq, spec.rope_layout, trig=back[spec.rope_key])
            for start, length, fid in state.spans:
                k, v = keys[:, start : start + length], values[:, start : start + length]
                if policy_state is None:
                    new.cache.store_block(layer, k, v, fid, index_keys=arrived[:, start : start + length])
                else:
                    order = order_of(layer, start, length) if order_of is not None and not sliding and length > 1 else None
                    new.store.layers[layer].append(k, v, order=order)
                    new.cache.layers[layer].regroup()  # the layout the streaming cache had made by now
            if arrived is not keys:  # what the streaming policy did when positions moved (VrexCache._move_layer)
                new.cache.positions_changed(layer, keys)
            if evicted is not None:
                if bool(evicted.any()):
                    new.store.layers[layer].evict(torch.nonzero(evicted).flatten())
            elif not sliding:
                evict = policy.evictable(layer, new.store.layers[layer].length)
                if evict is not None and evict.numel():
                    new.store.layers[layer].evict(evict)
        return new

    # -- durable sessions (vrex.engine.durable) ----------------------------------------------------
    def save(self, directory: str | Path | None = None, settings: dict[str, Any] | None = None) -> None:
        """Keep this session on disk. The first call names a new or empty ``directory`` and writes the
        whole state there (``settings``: the caller's run settings, checked again on ``load``); every
        later call (no argument) appends what the steps since the previous save added, atomically.
        ``run()`` then saves after each frame. Raises ``SessionSaveError`` (an ``OSError``) when the
        disk refuses; the directory keeps the last good save."""
        from vrex.engine import durable

        if directory is not None and (self._durable is None or Path(directory) != self._durable.dir):
            if self._durable is not None:
                self._durable.close()
            self._durable = durable.create(self, Path(directory), settings)
        elif self._durable is None:
            raise ValueError("save() needs a directory the first time")
        else:
            self._durable.save()

    @classmethod
    def load(cls, directory: str | Path, model: VideoLLM, *, policy: KVPolicy | None = None, config: SessionConfig | None = None,
             settings: dict[str, Any] | None = None, trace=None) -> "StreamingSession":
        """The session saved in ``directory``, at its last durable save, attached to it (``run`` keeps
        saving). ``policy``/``config``/``settings`` default to the saved ones; given, they must match,
        as must the model: else ``SessionMismatchError`` naming each difference. A damaged or partial
        directory raises ``SessionDamagedError`` (both are ``ValueError``)."""
        from vrex.engine import durable

        return durable.load(cls, Path(directory), model, policy=policy, config=config, extra=settings, trace=trace,
                            check_extra=settings is not None)

    @property
    def dialogue(self) -> list[dict[str, Any]]:
        """What was said so far: ``{"t", "kind", "text"}`` (+ ``"question"`` for answers), in order."""
        return self.state.dialogue

    @property
    def saved_frames(self) -> int | None:
        """Frames in the last durable save (None: not saved)."""
        return None if self._durable is None else int(self._durable.manifest["frames"])

    def close(self) -> None:
        """Close the session's files (its durable log; the store's temporary disk tier)."""
        if self._durable is not None:
            self._durable.close()
        self.store.close()

    def feed(self, ids: torch.Tensor, stage: Stage = "decode") -> torch.Tensor:
        """Feed text token ids as one step (no gate); returns logits [T, V]. For benchmarks and evaluation."""
        ids = torch.cat([self._pending, ids.to(self.model.device)])
        self._pending = self._pending[:0]
        return self._forward(self.model.embed_text(ids), stage, all_logits=True)[0]

    def run(self, frames: Iterable[tuple[float, Image.Image]], questions: Iterable[tuple[float, str]] = (),
            should_stop: Callable[[], bool] | None = None) -> Iterator[Event]:
        """Drive the session from any iterable of (t, image); yields events as they happen.

        A saved session (``save``/``load``) is saved after each frame, once its events were consumed.
        ``should_stop`` is asked before each frame: True ends the run there (saved, questions kept)."""
        for tq, q in questions:
            self.questions.add(q, tq)  # due once a frame at or past its time arrives
        for t, image in frames:
            yield from self.push_frame(t, image)
            if self._durable is not None:
                self._durable.save()
            if should_stop is not None and should_stop():
                return
        # Questions after the last frame are answered at the end of the stream, saying so.
        for t, q in self.questions.rest():
            event = self._answer(q, min(t, self.t) if self.frames else t)
            event.stats.update(late_answer_note(t, self.t))
            yield event
            if self._durable is not None:
                self._durable.save()

    def memory(self) -> dict[str, int]:
        tiers = self.store.resident_bytes()
        return {"kv_bytes": int(sum(tiers.values())), "rss_bytes": psutil.Process().memory_info().rss,
                **{f"{k}_bytes": int(v) for k, v in tiers.items()}}

    # -- internals ---------------------------------------------------------------------------
    def _answer_due(self) -> list[Event]:
        return [self._answer(q, t) for t, q in self.questions.due(self.t)]

    def _answer(self, question: str, t: float) -> Event:
        prompt = self.model.fmt.question.format(question=question)
        text, stats = self._generate(prompt, self.config.max_answer_tokens)
        self.state.dialogue.append({"t": t, "kind": "answer", "text": text, "question": question})
        return Event(t, "answer", text, {"question": question, "asked_at": t, "answered_at": self.t, **stats})

    def _generate(self, prompt: str, max_tokens: int) -> tuple[str, dict[str, Any]]:
        """Prefill ``pending + prompt`` and decode until the stop token; leaves the stream ready to resume."""
        t0 = time.perf_counter()
        ids = torch.cat([self._pending, self.model.tokenize(prompt)])
        self._pending = self._pending[:0]
        logits, _ = self._forward(self.model.embed_text(ids), "text")
        t_prefill = time.perf_counter()
        out: list[int] = []
        token_ms: list[float] = []
        records: list[StepRecord] = []
        for _ in range(max_tokens):
            crash_point("decode")  # tests: VREX_CRASH_AT=decode:N kills here (vrex.engine.persist)
            nxt = next_token(logits[-1], self.config, self._rng)
            out.append(nxt)
            if nxt in self.stop_ids:
                break
            t1 = time.perf_counter()
            logits, record = self._forward(self.model.embed_text(torch.tensor([nxt], device=self.model.device)), "decode")
            token_ms.append(1e3 * (time.perf_counter() - t1))
            records.append(record)
        ended = bool(out) and out[-1] in self.stop_ids
        # The stop token was predicted but not yet fed; feed it with the resume text on the next step.
        tail = ([out[-1]] if ended else self.model.tokenize(self.model.fmt.stop).tolist()) + self.model.tokenize(self.model.fmt.resume).tolist()
        self._pending = torch.tensor(tail, device=self.model.device)
        text = self.model.tokenizer.decode(out[:-1] if ended else out, skip_special_tokens=True).strip()
        stats = {"prompt_ms": 1e3 * (t_prefill - t0), "tokens": len(out), "token_ms": token_ms,
                 "mean_token_ms": sum(token_ms) / len(token_ms) if token_ms else None,
                 "cached_tokens": self.cached_tokens, **selection_summary(*records)}
        return text, stats

    @torch.no_grad()
    def _forward(
        self, embeds: torch.Tensor, stage: Stage, frame_id: int | None = None, frame_spans: list[tuple[int, int | None]] | None = None,
        *, all_logits: bool = False,
    ) -> tuple[torch.Tensor, StepRecord]:
        """One prefill/decode step of ``embeds`` [T, d] at the next positions; returns the last token's
        logits ``[1, V]``, or every token's ``[T, V]`` with ``all_logits``.

        The LIVE loop reads only the last token's logits (the gate, the next answer token). The other
        rows would cost the LM head for every frame token: 12 x 576 x 49152 multiply-adds per frame of
        the default model, about a fifth of the step's dense arithmetic, and a 2.4 MB buffer."""
        n = embeds.shape[0]
        positions = self._next_positions(n)
        if stage == "frame":
            crash_point("prefill")  # tests: VREX_CRASH_AT=prefill:N kills before the N-th frame step
        self.cache.begin_step(stage, frame_id, frame_spans)
        out = self.model.lm(
            inputs_embeds=embeds[None].to(self.model.lm.dtype), position_ids=positions[None].to(self.model.device), past_key_values=self.cache,
            use_cache=True, vrex_cache=self.cache, **({} if all_logits or not self._keeps_logits else {"logits_to_keep": 1}),
        )
        start = self.cached_tokens
        self.positions = torch.cat([self.positions, positions])
        self.state.stored_at = torch.cat([self.state.stored_at, positions])
        for length, fid in frame_spans or [(n, frame_id)]:
            self.spans.append((start, length, fid))
            start += length
        record = self.cache.end_step()
        self.last_record = record  # what the step read, per layer (benchmarks and evaluation read it)
        if self._durable is not None:
            self._durable.journal.end_step(n, frame_spans or [(n, frame_id)])
        if self.trace is not None:
            self.trace(record, {"t": self.t, "cached_tokens": self.cached_tokens, **self.store.counters()})
        return out.logits[0], record

    def _next_positions(self, n: int) -> torch.Tensor:
        t0 = time.perf_counter()
        pending = self.cache.reindex_pending
        reindexing = pending is not None
        if pending is not None:  # a spread re-index: the next layers move, or all of them if the old frame is full
            old_next = int(self.positions[-1]) + 1 + pending.shift
            self.cache.advance_reindex(len(pending.layers) if old_next + n > self.max_position else self._reindex_per_step)
        start = int(self.positions[-1]) + 1 if self.positions.numel() else 0
        spread = self._reindex_spread(n)
        # spread over s steps: begin s - 1 steps of this size early, so the old frame has room for them
        # (once there is a past beyond the sink: the system prompt's own step is no reason)
        early = spread > 1 and self.positions.numel() > self.cache.keep.sink_tokens and start + n * spread > self.max_position
        if self.config.positions.mode == "compress" and (start + n > self.max_position or early):
            start = self._compress_positions(spread)
            reindexing = True
        if reindexing:  # the step's stats say it, so a spike is explained
            self._reindex_ms += 1e3 * (time.perf_counter() - t0)
        return torch.arange(start, start + n)

    def _target_end(self) -> int:
        sink = self.cache.keep.sink_tokens
        return sink + int((self.max_position - sink) * self.config.positions.compress_to)

    def _reindex_spread(self, n: int) -> int:
        """Steps the layers of the next re-index move over: the configured ``spread``, at most one step per
        layer, and few enough that beginning ``spread - 1`` steps of ``n`` tokens early costs at most half
        of what a re-index frees (a small ``max_position``, as in tests, re-indexes at once)."""
        spread = self.config.positions.spread
        if spread == 1:
            return 1
        room = self.max_position - self._target_end()
        return max(1, min(spread, len(self.cache.specs), room // (2 * max(n, 1))))

    def _compress_positions(self, spread: int = 1) -> int:
        """Re-index cached tokens into the first part of the trained window (see positions.py); with
        ``spread`` > 1 the first of the layers move now, the rest over the next steps."""
        new = compressed_positions(self.positions, self.cache.keep.sink_tokens, self._target_end())
        delta = (new - self.positions).to(self.model.device)
        if spread == 1:
            self.cache.reindex(delta)  # each layer with its own RoPE (vrex.kv.layers)
        else:
            self._reindex_per_step = -(-len(self.cache.specs) // spread)
            self.cache.begin_reindex(delta, int(self.positions[-1]) - int(new[-1]))
            self.cache.advance_reindex(self._reindex_per_step)
        self.positions = new
        return int(new[-1]) + 1


def _make_store(geometry: Geometry, dtype: torch.dtype, device, policy: KVPolicy, config: SessionConfig) -> KVStore:
    if config.kv_dtype is not None:
        if config.kv_dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"kv_dtype must be None, 'bfloat16', 'float16' or 'float32', got {config.kv_dtype!r}")
        dtype = getattr(torch, config.kv_dtype)
    g = geometry
    budget = config.device_budget_bytes
    if budget is None and policy.offloads:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        budget = config.device_tokens * 2 * g.head_dim * g.num_kv_heads * g.num_layers * itemsize
    return KVStore(g.num_layers, g.num_kv_heads, g.head_dim, dtype=dtype, device=device,
                   device_budget_bytes=budget, host_budget_bytes=config.host_budget_bytes, disk_dir=config.disk_dir)

