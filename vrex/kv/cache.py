"""The streaming KV cache, plugged into transformers through its own extension points.

``VrexCache`` is a transformers ``Cache``: a stack of per-layer ``VrexCacheLayer`` objects behind
``update()``. ``update()`` stores the step's new post-RoPE keys/values in the tiered ``KVStore`` and
hands them back unchanged; the attention itself runs in the ``"vrex"`` attention function
(``vrex.kv.attention``), registered in transformers' ``AttentionInterface``, which calls
``VrexCache.attend()``: the policy selects past tokens per KV head, the store fetches them, and
attention runs over selected + always-kept + the step's own tokens. No model forward is rewritten.

Why the attention and not ``update()`` selects: selection needs the step's queries, which
transformers passes to the attention function, not to the cache.

Layer types (``layers``: ``vrex.kv.layers.LayerSpec`` per layer, from the model's config). A
sliding-window layer attends exactly as transformers masks it (the query at index ``i`` sees
``i - window < j <= i``, the sink included only while inside the window), its store drops every
token no later query can see (resident memory bounded by the window), and the policy never sees it:
no selection, no index (a window is already a bounded read; ``docs/architecture.md``). Full layers
go through the policy as before.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from vrex.kv.layers import HALF, STATIC_ROPE, LayerSpec, UnsupportedModel, rerotate, rotation
from vrex.kv.policy import KVPolicy, PackedSelection, Selection, Stage
from vrex.kv.store import KVStore, LayerKV


Kernels = Literal["fast", "reference"]
_EMPTY = torch.zeros(0, dtype=torch.int64)


# Up to this many query rows per KV head (a decode step: the G query heads of one token) the fast path
# attends in place over the selected slots (vrex.kv.fast attend_slots); more rows (frame and text steps)
# gather the selection a few rows at a time into cache-sized buffers for the kernel's own matrix products,
# which is faster there (measured in vrex/kv/fast/kernels.cpp).
_SLOT_ATTENTION_ROWS = 4
# Key rows per block of the frame/text-step kernel (attend_plan): None = the extension's ATTEND_COL_BLOCK
# (8192). A head reading more goes block by block with an online softmax, so its workspace stays bounded.
ATTEND_COLUMNS: int | None = None


@dataclass
class KeepConfig:
    """Tokens every step attends to whatever the policy selects ([U] in the V-Rex paper: implied).

    ``sink_tokens``: the first tokens (the system prompt; the engine sets it to the prompt length).
    ``recent_tokens``: the most recent past tokens (the recent window kept on the device tier).
    The current step's own tokens (the frame being prefilled, the token being decoded) are always
    attended causally.
    """

    sink_tokens: int = 0
    recent_tokens: int = 0


@dataclass
class _PendingReindex:
    """A position re-index moving one layer at a time (``VrexCache.begin_reindex``)."""

    delta: torch.Tensor  # [N0] new - old position of each token stored when it began
    shift: int  # old-frame position - new-frame position of every token stored since
    layers: list[int]  # still in the old frame, in the order they will move
    # per distinct RoPE, the rotation of every token moved so far (_Rotations): the N0 rows of ``delta``
    # computed once, the rows of tokens stored since appended as they come. Recomputed per step (the
    # token count changes every step), it was 90 ms of each re-indexing frame at 90K tokens.
    trig: dict = field(default_factory=dict)
    old_frame: dict = field(default_factory=dict)  # the ``shift`` rotation of a step's queries and keys, per RoPE
    # the keys handed to the policy, reused by every layer and step of this re-index (fast path): a fresh
    # [H, N, D] buffer per step paid its page faults (about a third of a layer's move at 32K tokens)
    scratch: torch.Tensor = field(default_factory=lambda: torch.empty(0))


class _Rotations:
    """``(cos, sin)`` rows of one RoPE for a pending re-index: rows ``0 .. N0-1`` rotate by ``delta``,
    later rows (tokens stored since it began) by ``-shift``. Rows are filled once, in buffers with
    headroom, so each step hands the kernel a prefix view instead of recomputing ``[N, R]`` sines."""

    def __init__(self, delta: torch.Tensor, shift: int, inv_freq: torch.Tensor, layout: str):
        self.shift, self.inv_freq, self.layout = shift, inv_freq, layout
        self.rows = delta.numel()
        cos, sin = rotation(delta, inv_freq, layout)
        self.cos, self.sin = self._grown(cos, self.rows), self._grown(sin, self.rows)

    def _grown(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """Room for ``n`` rows and headroom after them, holding ``t``'s first ``self.rows`` rows."""
        out = t.new_empty(n + max(1024, n // 8), t.shape[1])
        out[:self.rows] = t[:self.rows]
        return out

    def upto(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotations of tokens ``0 .. n-1`` (contiguous views)."""
        if n > self.rows:
            if n > self.cos.shape[0]:
                self.cos, self.sin = self._grown(self.cos, n), self._grown(self.sin, n)
            cos, sin = rotation(torch.tensor([-self.shift]), self.inv_freq, self.layout)  # one angle for them all
            self.cos[self.rows:n] = cos
            self.sin[self.rows:n] = sin
            self.rows = n
        return self.cos[:n], self.sin[:n]


@dataclass
class StepRecord:
    """What one forward step did, per layer (telemetry input)."""

    stage: Stage
    frame_id: int | None
    n_new: int
    layers: list[dict[str, Any]] = field(default_factory=list)


class VrexCacheLayer(CacheLayerMixin):
    """One attention layer of the stream's cache, owning its state: its tiered K/V (``kv``, the store's
    ``LayerKV``), its type and RoPE (``spec``), a sliding layer's dropped prefix (``window_lo``) and the
    tokens a regroup has covered (``grouped``). transformers calls ``update()`` on it; the ``"vrex"``
    attention function reaches ``attend()`` through ``VrexCache.attend``. What the layers share (the
    policy, the always-kept tokens, the step in progress, scratch buffers, a re-index in progress) is the
    cache's (``self.cache``)."""

    is_sliding = False  # transformers' masks are not used on the cache path: attend() masks a window itself

    def __init__(self, cache: "VrexCache", spec: LayerSpec, kv: LayerKV):
        super().__init__()
        # a weak reference: the cache holds its layers, and a layer holding its cache would make the pair a
        # reference cycle, so a dropped session's KV (gigabytes at an hour) would wait for a garbage collection
        self.cache = weakref.proxy(cache)
        self.spec, self.kv = spec, kv
        self.layer_idx = spec.index
        self.window_lo = 0  # sliding: tokens below this id were dropped
        self.grouped = 0  # tokens below this id were regrouped (or left as they were)
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise ValueError(f"VrexCache holds one stream (batch 1); got a batch of {key_states.shape[0]}")
        if self.layer_idx in self.cache._pending:
            raise RuntimeError(
                "VrexCache: the previous step's keys were never attended. Run the model with "
                "attn_implementation='vrex' and pass vrex_cache=<the cache> to its forward."
            )
        # Stored after attention (in attend), so the store holds exactly the past during selection.
        self.cache._pending.add(self.layer_idx)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.kv.length

    def get_max_length(self) -> int:
        return -1

    # -- attention (VrexCache.attend hands each layer's call here) -----------------------------
    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
               softcap: float | None = None) -> torch.Tensor:
        """Attention of the step's queries ``[1, H_q, T, D]`` over selected past + the new ``key``/``value``.

        ``softcap``: tanh soft-capping of the scores (Gemma 2), as transformers' eager attention does.
        Returns ``[1, T, H_q, D]`` as transformers' attention functions do.
        """
        c = self.cache
        if query.dtype != torch.float32 and query.device.type == "cpu":
            # A bf16 LM: attention runs in float32 on CPU (the fast kernels' type; bf16 score matmuls and
            # softmax were slower here at long contexts), the output goes back in the LM's type.
            out = self.attend(query.float(), key.float(), value.float(), scaling, softcap)
            return out.to(query.dtype)
        t0 = time.perf_counter()
        c._pending.discard(self.layer_idx)
        query, key = c._to_old_frame(self.layer_idx, query, key)
        if self.spec.sliding:
            return self._attend_window(query, key, value, scaling, softcap, t0)
        if c.kernels == "fast":  # CPU only, and attention runs in float32 there (above)
            return self._attend_fast(query, key, value, scaling, t0, softcap)
        n_new = key.shape[-2]
        n_past = self.kv.length
        q = query[0]
        selection = c.policy.select(self.layer_idx, q, n_past, c.stage) if n_past else Selection.everything()
        indices = c._with_always_kept(selection.indices, n_past)
        if indices is None:
            # Read everything: store the new tokens first and attend over the store's own buffer
            # (a view when it is all on the device tier), so no copy of the whole cache is made.
            self._store_and_index(key[0], value[0])
            k, v, _ = self.kv.gather(None)
            k, v = k.to(q.dtype), v.to(q.dtype)  # no copy unless the KV is stored in another type (bf16)
            valid = None
        else:
            k_past, v_past, valid = self.kv.gather(indices)
            k = torch.cat([k_past.to(key.dtype), key[0]], dim=1)
            v = torch.cat([v_past.to(value.dtype), value[0]], dim=1)
            self._store_and_index(key[0], value[0])
        t_fetch = time.perf_counter()
        out = _attention(q, k, v, n_new, valid, scaling, softcap, scratch=c._scores)
        selected = n_past if indices is None else [int(i.numel()) for i in indices]
        return self._finish(out, n_new, n_past, selected, selection.stats, t0, t_fetch)

    def _attend_fast(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                     t0: float, softcap: float | None = None) -> torch.Tensor:
        """The fast path (vrex.kv.fast): the same tokens as the reference, planned and gathered in C++
        (one copy per step and layer, read from every tier in place, the disk tier through its memory
        maps), attended with the kernel's own products. `full` goes this way too: on 2 CPU cores the
        kernel's blocked products beat torch's matmul + softmax over the device buffer itself (frame
        step at 16K cached tokens 256 against 335 ms, decode 123 against 140 ms; a 32-frame fill
        chunk 8.6 against 19 s), so a policy's gain over `full` is its selection, not its kernel."""
        c = self.cache
        from vrex.kv.fast import load

        n_past = self.kv.length
        q = query[0]
        if n_past:
            selection = c.policy.select_packed(self.layer_idx, q, n_past, c.stage, want_stats=c.record_stats)
        else:
            selection = PackedSelection(_EMPTY, _EMPTY, True)
        sink = min(c.keep.sink_tokens, n_past)
        recent_start = max(sink, n_past - c.keep.recent_tokens)
        plan = self.kv.read_plan(selection.ids, selection.offs, selection.everything, n_past, sink, recent_start,
                                 n_new=key.shape[-2])
        rows = q.shape[0] // key.shape[1] * key.shape[-2]  # query rows per KV head
        if rows <= _SLOT_ATTENTION_ROWS and softcap is None and q.shape[-1] in (32, 64, 128):
            # decode: attention read in place from the selected slots (each row read once, no copy)
            t_fetch = time.perf_counter()
            out = load().attend_slots(q.float() * scaling, plan.kbufs, plan.vbufs, plan.slots, plan.offs, key[0], value[0],
                                      **plan.turn_args)
        else:
            # frame/text steps: per KV head, its rows gathered a few at a time into a reused workspace
            # (the gather is inside: fetch_s is the planning only)
            t_fetch = time.perf_counter()
            ext = load()
            out = ext.attend_plan(q.float() * scaling, plan.kbufs, plan.vbufs, plan.slots, plan.offs, key[0], value[0],
                                  softcap or 0.0, c._workspace, ATTEND_COLUMNS or ext.ATTEND_COL_BLOCK, **plan.turn_args)
        plan.done()
        self._store_and_index(key[0], value[0])
        selected = n_past if selection.everything else plan.selected
        return self._finish(out.to(query.dtype), key.shape[-2], n_past, selected, selection.stats, t0, t_fetch)

    def _attend_window(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                       softcap: float | None, t0: float) -> torch.Tensor:
        """A sliding layer: every token of its window (the store holds nothing older), masked per query
        row as transformers masks it; the policy is not asked (see the module docstring)."""
        c = self.cache
        window = self.spec.window
        n_new, n_past = key.shape[-2], self.kv.length
        self._trim_window()  # no-op while streaming; after a restore (store filled directly) it sets the bound
        lo = self.window_lo
        if n_past > lo:
            k_past, v_past, _ = self.kv.gather(None)  # the live tokens: ids lo .. n_past - 1, in order
        else:
            k_past = v_past = key[0, :, :0]
        t_fetch = time.perf_counter()
        k = torch.cat([k_past.to(key.dtype), key[0]], dim=1)
        v = torch.cat([v_past.to(value.dtype), value[0]], dim=1)
        cols = torch.cat([torch.arange(lo, n_past), n_past + torch.arange(n_new)])
        rows = n_past + torch.arange(n_new)
        allowed = (cols[None, :] <= rows[:, None]) & (cols[None, :] > rows[:, None] - window)  # [T, L + T]
        out = _masked_attention(query[0], k, v, allowed.to(query.device), scaling, softcap)
        self._store_and_index(key[0], value[0])
        stats = {"window": window, "dropped": self.window_lo,
                 "saved_bytes": self.window_lo * c.store.token_bytes_all_heads}
        return self._finish(out, n_new, n_past, n_past - lo, stats, t0, t_fetch)

    def _finish(self, out: torch.Tensor, n_new: int, n_past: int, selected, stats: dict, t0: float,
                t_fetch: float) -> torch.Tensor:
        """Record the step's layer, let the policy evict, return transformers' layout [1, T, H_q, D]."""
        c = self.cache
        if c.record is not None:
            c.record.n_new = n_new
            c.record.layers.append(
                {"layer": self.layer_idx, "n_past": n_past, "selected": selected, "stats": stats,
                 "fetch_s": t_fetch - t0, "attend_s": time.perf_counter() - t_fetch})
        if self.spec.sliding:
            return out.transpose(0, 1).unsqueeze(0)
        evict = c.policy.evictable(self.layer_idx, self.kv.length)
        if evict is not None and evict.numel():
            self.kv.evict(evict)
        return out.transpose(0, 1).unsqueeze(0)

    def _store_and_index(self, key: torch.Tensor, value: torch.Tensor) -> None:
        c = self.cache
        offset = 0
        for n_tokens, frame_id in c.frame_spans or [(key.shape[1], c.frame_id)]:
            # One store block per frame, so a frame's cluster-contiguous layout applies to its own block.
            c.store_block(self.layer_idx, key[:, offset:offset + n_tokens], value[:, offset:offset + n_tokens], frame_id)
            offset += n_tokens

    def store_block(self, keys: torch.Tensor, values: torch.Tensor, frame_id: int | None,
                    index_keys: torch.Tensor | None = None) -> int:
        """Index a block with the policy, then write it once, in the policy's cluster-contiguous
        order if it has one (ReSV's ``block_order``: the KV memory unit's layout). Returns its first id.
        ``index_keys``: what the policy indexes instead of ``keys`` (a fork: the keys at the positions
        the block arrived at, ``StreamingSession.from_state``)."""
        c = self.cache
        start = self.kv.length
        if self.spec.sliding:
            start = self.kv.append(keys, values)
            self._trim_window()
            return start
        c.policy.on_append(self.layer_idx, keys if index_keys is None else index_keys, start, frame_id)
        block_order = getattr(c.policy, "block_order", None)
        order = block_order(self.layer_idx, start, keys.shape[1]) if block_order is not None and keys.shape[1] > 1 else None
        start = self.kv.append(keys, values, order=order)
        self.regroup()
        return start

    def regroup(self) -> None:
        """Once the policy's span of tokens was stored since the last time, rewrite those blocks as one
        in the policy's cluster order (``LayerKV.regroup``: a cluster read in one run, not one per frame).
        Called after every block the layer stores."""
        c = self.cache
        span_of, order_of = getattr(c.policy, "regroup_span", None), getattr(c.policy, "block_order", None)
        span = span_of() if span_of is not None and order_of is not None else None
        n = self.kv.length
        if span is None or n - self.grouped < span or self.spec.sliding:
            return
        self.kv.regroup(self.grouped, n, lambda a, b: order_of(self.layer_idx, a, b - a))
        self.grouped = n

    def _trim_window(self) -> None:
        """Drop the tokens of a sliding layer that no later query can see (below ``n + 1 - window``)."""
        lo = self.kv.length + 1 - self.spec.window
        if lo > self.window_lo:
            self.kv.evict(torch.arange(self.window_lo, lo))
            self.window_lo = lo


class VrexCache(Cache):
    """KV cache for one stream: tiered store + selection policy + always-kept tokens."""

    def __init__(self, store: KVStore, policy: KVPolicy, keep: KeepConfig | None = None, *, num_q_heads: int,
                 kernels: Kernels = "fast", layers: list[LayerSpec] | None = None):
        if kernels not in ("fast", "reference"):
            raise ValueError(f"kernels must be 'fast' or 'reference', got {kernels!r}")
        self.store, self.policy = store, policy
        #: "fast": C++ selection + attention over the store's slots (vrex.kv.fast); "reference": PyTorch.
        #: The fast path needs CPU tensors; elsewhere the reference runs.
        self.kernels: Kernels = kernels if store.device.type == "cpu" else "reference"
        #: Build the policies' telemetry-only statistics (set by the session when a trace is written).
        self.record_stats = True
        self.keep = keep or KeepConfig()
        # per-layer type and RoPE (None: every layer full attention, no re-indexing)
        specs = list(layers) if layers is not None else [LayerSpec(i) for i in range(store.num_layers)]
        if len(specs) != store.num_layers:
            raise ValueError(f"{len(specs)} layer specs for a store of {store.num_layers} layers")
        super().__init__(layers=[VrexCacheLayer(self, spec, kv) for spec, kv in zip(specs, store.layers)])
        policy.setup(store.num_layers, store.num_kv_heads, num_q_heads, store.head_dim)
        policy.kernels = self.kernels
        self._pending: set[int] = set()  # layers whose step keys await VrexCache.attend
        self._pending_reindex: _PendingReindex | None = None  # a re-index moving layer by layer
        self._workspace = torch.empty(0)  # the fast path's gather + scores scratch, reused by every layer and step
        self._scores = torch.empty(0)  # the reference path's scores and probabilities (see _attention's scratch)
        self.stage: Stage = "text"
        self.frame_id: int | None = None
        self.frame_spans: list[tuple[int, int | None]] | None = None
        self.record: StepRecord | None = None

    # -- step bookkeeping (called by the engine around each forward) ------------------------
    def begin_step(self, stage: Stage, frame_id: int | None = None, frame_spans: list[tuple[int, int | None]] | None = None) -> None:
        """Start a forward step. ``frame_spans`` ([(n_tokens, frame_id), ...]) splits a step that carries
        several frames (bulk fast-forward) so policies index each frame separately."""
        self.stage, self.frame_id = stage, frame_id
        self.frame_spans = frame_spans
        self.record = StepRecord(stage=stage, frame_id=frame_id, n_new=0)

    def end_step(self) -> StepRecord | None:
        record, self.record = self.record, None
        return record

    @property
    def specs(self) -> list[LayerSpec]:
        """Each layer's type and RoPE (``VrexCacheLayer.spec``), in layer order."""
        return [layer.spec for layer in self.layers]

    # -- per-layer calls, by layer index (transformers' attention function and the engine know the index) --
    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
               softcap: float | None = None) -> torch.Tensor:
        """``layers[layer].attend``: the step's attention in that layer (``VrexCacheLayer.attend``)."""
        return self.layers[layer].attend(query, key, value, scaling, softcap)

    def store_block(self, layer: int, keys: torch.Tensor, values: torch.Tensor, frame_id: int | None,
                    index_keys: torch.Tensor | None = None) -> int:
        """``layers[layer].store_block``. Every block a layer stores goes through here, so a journal
        (``vrex.engine.durable``) that wraps this method on the instance sees each one."""
        return self.layers[layer].store_block(keys, values, frame_id, index_keys)

    def reindex(self, delta: torch.Tensor) -> None:
        """Move every stored key by ``delta`` [N] positions (position re-indexing, ``vrex.engine.positions``),
        each layer with its own RoPE frequencies and rotary width; full layers' policy indexes follow."""
        self.begin_reindex(delta, 0)
        self.finish_reindex()

    def begin_reindex(self, delta: torch.Tensor, shift: int) -> None:
        """Start re-indexing the ``N`` stored tokens by ``delta`` [N], one layer at a time (``advance_reindex``),
        so no single step pays for every layer. Until a layer has moved it stays in the old frame: the
        tokens stored from now on arrive at new positions, and a pending layer turns their queries and keys
        ``shift`` positions forward (old frame = new + ``shift``) before it attends and stores them, so it
        computes exactly what it computed before re-indexing began. A re-index still pending finishes first."""
        self._check_reindexable()
        self.finish_reindex()
        self._pending_reindex = _PendingReindex(delta.cpu(), int(shift), [spec.index for spec in self.specs])

    def advance_reindex(self, layers: int) -> None:
        """Move the next ``layers`` pending layers into the new frame (each by ``delta`` for the tokens the
        re-index began with, ``-shift`` for those stored since)."""
        p = self._pending_reindex
        if p is None:
            return
        moving, p.layers = p.layers[:layers], p.layers[layers:]
        for layer in moving:
            self._move_layer(self.layers[layer].spec, p)
        if not p.layers:
            self._pending_reindex = None

    def finish_reindex(self) -> None:
        """Move every pending layer now (a save, a fork, a step the old frame has no room for)."""
        if self._pending_reindex is not None:
            self.advance_reindex(len(self._pending_reindex.layers))

    @property
    def reindex_pending(self) -> "_PendingReindex | None":
        """The re-index in progress: its ``shift`` and the layers still in the old frame (None: none)."""
        return self._pending_reindex

    def current_keys(self, layer: int) -> torch.Tensor:
        """``store.layers[layer].keys()`` at the positions the stream now has: a layer still in the old frame is
        moved on a copy (the store is not touched). What a fork copies."""
        keys = self.layers[layer].kv.keys()
        p = self._pending_reindex
        if p is None or layer not in p.layers:
            return keys
        spec = self.layers[layer].spec
        return rerotate(keys, self._pending_delta(p, layer), spec.inv_freq, spec.rope_layout)

    def _pending_delta(self, p: "_PendingReindex", layer: int) -> torch.Tensor:
        """A pending layer's move: ``delta`` for the tokens the re-index began with, ``-shift`` after them."""
        added = self.layers[layer].kv.length - p.delta.numel()
        return torch.cat([p.delta, torch.full((added,), -p.shift, dtype=p.delta.dtype)])

    def positions_changed(self, layer: int, keys: torch.Tensor) -> None:
        """The layer's stored tokens sit at new positions, ``keys`` [H, N, D] (arrival order) as they are
        now: a policy that derives its index from the keys re-derives it (``_move_layer`` does the same
        for a live re-index)."""
        if not self.layers[layer].spec.sliding and self._policy_indexes_keys:
            self.policy.on_positions_changed(layer, keys.to(self.store.dtype))

    def _check_reindexable(self) -> None:
        for spec in self.specs:
            if spec.inv_freq is None:
                raise UnsupportedModel(f"layer {spec.index} has no RoPE to re-index; use positions 'absolute'")
            if spec.rope_type not in STATIC_ROPE:
                raise UnsupportedModel(
                    f"layer {spec.index}: RoPE type '{spec.rope_type}' changes its frequencies with the sequence length, "
                    f"so stored keys cannot be moved to new positions; use positions 'absolute'")
            if spec.rope_layout is None:
                raise UnsupportedModel(
                    f"layer {spec.index}: its RoPE moves keys neither as half-split nor as interleaved-pair rotation "
                    f"(measured by vrex.kv.layers.rope_layouts), so stored keys cannot be moved; use positions 'absolute'")

    def _move_layer(self, spec: LayerSpec, p: _PendingReindex) -> None:
        """Rotate one pending layer's stored keys into the new frame (``_pending_delta``); its policy index
        follows. The rotations are ``p.trig``'s, shared by layers with one RoPE and kept across steps."""
        if spec.rope_key not in p.trig:
            p.trig[spec.rope_key] = _Rotations(p.delta, p.shift, spec.inv_freq, spec.rope_layout)
        same = p.trig[spec.rope_key].upto(self.layers[spec.index].kv.length)
        wants_keys = not spec.sliding and self._policy_indexes_keys
        delta = self._pending_delta(p, spec.index)
        if self.kernels == "fast":  # in place in the device and host tiers, recorded on disk (vrex.kv.fast)
            keys = p.scratch if wants_keys else None
            self.layers[spec.index].kv.rotate_keys(*same, spec.rope_layout == HALF, keys, moves=delta, rope=spec)
        else:
            keys = rerotate(self.layers[spec.index].kv.keys(), delta, spec.inv_freq, spec.rope_layout, trig=same)
            self.layers[spec.index].kv.set_keys(keys, moves=delta, rope=spec)
            # what the store gives now, as the fast path hands it on: the disk tier's keys turned once by all
            # they owe (rerotating the keys read before the move would round them twice)
            keys = self.layers[spec.index].kv.keys() if wants_keys else None
        if wants_keys:
            self.policy.on_positions_changed(spec.index, keys)

    def _to_old_frame(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer still in the old frame sees the step's queries and keys ``shift`` positions forward."""
        p = self._pending_reindex
        if p is None or p.shift == 0 or layer not in p.layers:
            return query, key
        spec = self.layers[layer].spec
        move = torch.tensor([p.shift])  # one angle for every token of every step: its row broadcasts over them
        if spec.rope_key not in p.old_frame:
            p.old_frame[spec.rope_key] = rotation(move, spec.inv_freq, spec.rope_layout)
        trig = p.old_frame[spec.rope_key]
        return (rerotate(query, move, spec.inv_freq, spec.rope_layout, trig=trig),
                rerotate(key, move, spec.inv_freq, spec.rope_layout, trig=trig))

    @property
    def _policy_indexes_keys(self) -> bool:
        """The policy re-derives an index from the keys when positions move (it overrides the hook)."""
        return type(self.policy).on_positions_changed is not KVPolicy.on_positions_changed

    def _with_always_kept(self, indices: list[torch.Tensor] | None, n_past: int) -> list[torch.Tensor] | None:
        if indices is None:
            return None
        sink = min(self.keep.sink_tokens, n_past)
        middle_end = max(sink, n_past - self.keep.recent_tokens)
        if sink == 0 and middle_end == n_past:
            return indices
        # Policies return sorted unique ids, so the union with the two kept ranges stays sorted and
        # unique by splicing: [0, sink) + selected ids in between + [middle_end, n_past). No sort.
        head, tail = torch.arange(sink), torch.arange(middle_end, n_past)
        out = []
        for idx in indices:
            idx = idx.cpu()
            out.append(torch.cat([head, idx[(idx >= sink) & (idx < middle_end)], tail]))
        return out


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_new: int, valid: torch.Tensor | None, scaling: float,
    softcap: float | None = None, *, scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention for one stream, GQA-aware.

    ``q`` [H_q, T, D]; ``k``/``v`` [H_kv, L + T, D]: the attended past followed by the step's own
    ``n_new`` = T tokens, attended causally. ``valid`` [H_kv, L] masks padding in per-head
    selections. Returns [H_q, T, D].

    The query heads that share a KV head are folded into the row dimension ([H_kv, G*T, D]), so K/V
    are never repeated per query head. On CPU this is several times faster than
    ``scaled_dot_product_attention`` on 3-D inputs for one decode row over a long cache.

    ``scratch`` (float32, resized here as needed): the scores and the probabilities, the step's two
    largest tensors, are written into it instead of fresh allocations. At 16K cached tokens they are
    7 MB per layer; freshly allocated, blocks that size are new memory mappings under
    ``vrex.engine.heap``'s fixed threshold, and their page faults made `full`'s frame step 1.5x slower.
    """
    h_q, t, d = q.shape
    h_kv, n_ctx = k.shape[0], k.shape[1]
    groups = h_q // h_kv
    n_past = n_ctx - n_new
    shape = (h_kv, groups * t, n_ctx)
    if scratch is not None and (torch.is_grad_enabled() or q.dtype != torch.float32 or v.dtype != torch.float32
                                or scratch.device != q.device):
        scratch = None  # out= buffers only where nothing is differentiated and the types match
    if scratch is not None:
        need = 2 * shape[0] * shape[1] * shape[2]
        if scratch.numel() < need:
            scratch.resize_(need)
        buf_scores, buf_probs = scratch[:need // 2].view(shape), scratch[need // 2:need].view(shape)
    # The scale goes on the few query rows, not on the [rows x N] scores: one pass less over the
    # largest tensor of the step (about 10% of a frame step at 32K cached tokens).
    scores = torch.matmul(q.reshape(h_kv, groups * t, d) * scaling, k.transpose(1, 2),
                          **({} if scratch is None else {"out": buf_scores}))  # [H_kv, G*T, N]
    if softcap is not None:  # transformers' order: scale, cap, then mask
        scores = torch.tanh(scores / softcap) * softcap
    # Masks touch only the columns they concern (padding: the past; causality: the step's own
    # tokens), so a long cache costs no [rows x N] mask.
    if valid is not None:
        scores[:, :, :n_past].masked_fill_(~valid.to(q.device)[:, None, :], float("-inf"))
    if t > 1:
        rows = torch.arange(t, device=q.device)
        future = (rows[None, :] > rows[:, None]).repeat(groups, 1)  # [G*T, T]: row (g, i) may not see j > i
        scores[:, :, n_past:].masked_fill_(future[None], float("-inf"))
    if scratch is not None:
        out = torch.matmul(torch.softmax(scores, -1, out=buf_probs), v)
    else:
        out = torch.matmul(scores.float().softmax(-1).to(v.dtype), v)  # [H_kv, G*T, D]
    return out.reshape(h_q, t, d)


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scaling: float,
                      softcap: float | None) -> torch.Tensor:
    """``_attention`` with an explicit ``allowed`` [T, N] mask shared by all heads (sliding layers)."""
    h_q, t, d = q.shape
    h_kv = k.shape[0]
    groups = h_q // h_kv
    scores = torch.matmul(q.reshape(h_kv, groups * t, d), k.transpose(1, 2)) * scaling  # [H_kv, G*T, N]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores.masked_fill_(~allowed.repeat(groups, 1)[None], float("-inf"))
    out = torch.matmul(scores.float().softmax(-1).to(v.dtype), v)
    return out.reshape(h_q, t, d)
