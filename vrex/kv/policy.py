"""The contract between the streaming KV cache and a KV selection policy.

A policy decides, per layer and per KV head, which *past* tokens an attention step reads.
The cache (``vrex.kv.cache``) owns storage; the policy only sees keys (to index them) and
queries (to select). Always-kept tokens (sink / system prompt, the recent window, and the
current step's own tokens) are added by the cache, so a policy never has to return them.

Lifecycle, per layer::

    policy.setup(num_layers, num_kv_heads, num_q_heads, head_dim)      # once per session
    sel = policy.select(layer, queries, n_past, stage)  # every step: the past before this step
    policy.on_append(layer, keys, start, frame_id)   # every step, after attention, once per frame block
    dropped = policy.evictable(layer, n_total)        # optional: tokens the store may drop for good

Shapes: ``keys`` is ``[H_kv, T_new, D]`` (post-RoPE, as stored), ``queries`` is ``[H_q, T_q, D]``
(post-RoPE). Token indices are positions in the layer's store, 0-based, in arrival order.

Sliding-window layers (Mistral, Gemma 2/3 local layers, Qwen2 with ``use_sliding_window``;
``VrexCache.specs``) never reach the policy: no ``select``, ``on_append`` or ``evictable`` call for
them. They read their whole window, which the store already bounds (it drops what falls out), so a
selection would save little and an index over them would cost memory for tokens already gone.
A policy therefore selects only on full-attention layers, among tokens those layers may see.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

import torch

Stage = Literal["frame", "text", "decode"]
"""``frame``: a frame's iterative prefill; ``text``: prefill of a prompt/question/turn;
``decode``: one generated token. Policies may use different budgets per stage (the paper does)."""


@dataclass
class Selection:
    """Which past tokens each KV head reads in one attention step.

    ``indices`` is ``None`` for "every past token", else one sorted, unique ``int64`` tensor per
    KV head with indices in ``[0, n_past)``. ``stats`` carries policy telemetry (for ReSV:
    clusters scanned, early-exit fraction, ...) as plain numbers.
    """

    indices: list[torch.Tensor] | None
    stats: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def everything() -> "Selection":
        return Selection(indices=None)


@dataclass
class PackedSelection:
    """The fast path's form of a :class:`Selection`: every KV head's sorted ids in one tensor.

    ``ids`` int64 ``[total]`` holds head ``h``'s ids at ``ids[offs[h]:offs[h + 1]]``; ``offs`` is
    int64 ``[H_kv + 1]``. ``everything`` = read every past token (``ids``/``offs`` unused).
    """

    ids: torch.Tensor
    offs: torch.Tensor
    everything: bool = False
    stats: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def pack(selection: Selection, num_kv_heads: int) -> "PackedSelection":
        if selection.indices is None:
            return PackedSelection(_EMPTY, _EMPTY, True, selection.stats)
        lengths = torch.tensor([0] + [int(i.numel()) for i in selection.indices], dtype=torch.int64)
        ids = torch.cat([i.to(torch.int64).cpu() for i in selection.indices]) if num_kv_heads else _EMPTY
        return PackedSelection(ids, lengths.cumsum(0), False, selection.stats)

    def unpack(self) -> Selection:
        if self.everything:
            return Selection(None, self.stats)
        o = self.offs.tolist()
        return Selection([self.ids[o[h]:o[h + 1]] for h in range(len(o) - 1)], self.stats)


_EMPTY = torch.zeros(0, dtype=torch.int64)


@dataclass
class KVPolicy:
    """Base class. Subclasses are small dataclasses, one per file in ``vrex.kv.policies``."""

    name: ClassVar[str] = "base"
    #: True when the policy expects the store to keep the full KV offloaded (tiers) and fetch
    #: only the selection; False when it keeps everything on the device tier (``full``).
    offloads: ClassVar[bool] = True
    #: "fast" when the cache runs the C++ kernels (vrex.kv.fast), set by VrexCache: a policy with a
    #: fused implementation of its own bookkeeping (ReSV's HC table) uses it then. Not a parameter.
    kernels = "reference"

    def setup(self, num_layers: int, num_kv_heads: int, num_q_heads: int, head_dim: int) -> None:
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.num_q_heads, self.head_dim = num_q_heads, head_dim

    def on_append(self, layer: int, keys: torch.Tensor, start: int, frame_id: int | None) -> None:
        """Index the tokens ``start .. start + T_new - 1`` just stored for ``layer``."""

    def select(self, layer: int, queries: torch.Tensor, n_past: int, stage: Stage) -> Selection:
        """Return the past tokens (``< n_past``) that ``queries`` attend to, per KV head."""
        raise NotImplementedError

    def select_packed(self, layer: int, queries: torch.Tensor, n_past: int, stage: Stage,
                      want_stats: bool = False) -> PackedSelection:
        """The same choice as :meth:`select`, packed for the fast path. Policies with a fused
        implementation (ReSV) override it; ``want_stats`` False lets them skip telemetry-only work."""
        return PackedSelection.pack(self.select(layer, queries, n_past, stage), self.num_kv_heads)

    def evictable(self, layer: int, n_total: int) -> torch.Tensor | None:
        """Token indices the store may delete permanently (StreamingLLM-style); ``None`` = keep all."""
        return None

    # -- persistence (durable sessions, vrex.engine.durable) ---------------------------------
    def params(self) -> dict[str, Any]:
        """The constructor parameters (``make_policy(name, **params)`` rebuilds this policy)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def state_dict(self) -> dict[str, Any]:
        """Everything the policy learned from the stream (indexes, frontiers), as tensors and plain
        values, with its name, parameters and the shapes from ``setup``; ``load_state_dict`` on a
        policy built with the same parameters and set up with the same shapes restores it exactly."""
        dims = [getattr(self, k, None) for k in ("num_layers", "num_kv_heads", "num_q_heads", "head_dim")]
        return {"policy": self.name, "params": self.params(), "dims": dims, "state": self._state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output; a state of another policy, parameters or model shape raises
        ``ValueError`` naming what differs."""
        if state.get("policy") != self.name:
            raise ValueError(f"policy state is of '{state.get('policy')}', not '{self.name}'")
        mine = self.params()
        diff = sorted(k for k in set(mine) | set(state.get("params", {})) if mine.get(k) != state["params"].get(k))
        if diff:
            raise ValueError(f"policy state of '{self.name}' has other parameters: "
                             + ", ".join(f"{k}={state['params'].get(k)!r} (this policy: {mine.get(k)!r})" for k in diff))
        dims = [getattr(self, k, None) for k in ("num_layers", "num_kv_heads", "num_q_heads", "head_dim")]
        if list(state.get("dims", [])) != dims:
            raise ValueError(f"policy state of '{self.name}' is for layers/KV heads/query heads/head dim {state.get('dims')}, "
                             f"this policy is set up for {dims}")
        self._load_state(state["state"])

    def _state(self) -> dict[str, Any]:
        """Subclasses with stream state return it here (default: none)."""
        return {}

    def _load_state(self, state: dict[str, Any]) -> None:
        pass

    def on_positions_changed(self, layer: int, keys: torch.Tensor) -> None:
        """Stored keys were re-rotated (position re-indexing): rebuild key-derived indexes.

        ``keys`` is the layer's whole key store ``[H_kv, N, D]`` after re-rotation (evicted rows zero).
        It may be a buffer the cache reuses for the next layer: copy what you keep.
        """
