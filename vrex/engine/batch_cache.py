"""One transformers ``Cache`` over the caches of B streams, so their steps share one LM forward.

The LM's dense layers (projections, MLPs, norms, the head) see a ``[B, T, d]`` batch and read their
weights once per step; attention does not mix the rows: the ``"vrex"`` attention function calls
``BatchedCache.attend``, which hands row ``b`` to stream ``b``'s own ``VrexCache.attend`` (its policy,
tiers, ReSV tables, always-kept tokens). Each stream's cache therefore sees exactly the calls it
would see running alone, one row at a time.

Only equal-length steps batch (the rows of one tensor); the engine (``vrex.engine.batch``) groups them.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from vrex.kv.cache import VrexCache


class _BatchedLayer(CacheLayerMixin):
    """Layer view for transformers' mask sizing; the K/V themselves go to the streams in ``attend``."""

    def __init__(self, members: list, layer_idx: int):
        super().__init__()
        self.members, self.layer_idx = members, layer_idx  # each stream's own layer object
        self.is_sliding = getattr(members[0], "is_sliding", False)
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # Stored after attention, by each stream's VrexCache.attend (as for one stream).
        return key_states, value_states

    def _longest(self):
        return max(self.members, key=lambda layer: layer.get_seq_length())

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The "vrex" attention builds its own per-stream masks; this only sizes transformers' unused one.
        return self._longest().get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self._longest().get_seq_length()

    def get_max_length(self) -> int:
        return -1


class BatchedCache(Cache):
    """The caches of the B rows of one forward, in row order. Pass it as both ``past_key_values``
    and ``vrex_cache``; every member must already be in a step (``begin_step``)."""

    def __init__(self, caches: list[VrexCache]):
        if not caches:
            raise ValueError("BatchedCache needs at least one stream cache")
        n_layers = {len(c.layers) for c in caches}
        if len(n_layers) != 1:
            raise ValueError(f"stream caches disagree on the number of layers: {sorted(n_layers)}")
        self.caches = list(caches)
        layers = [_BatchedLayer([c.layers[i] for c in caches], i) for i in range(n_layers.pop())]
        super().__init__(layers=layers)

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float, **kwargs) -> torch.Tensor:
        """``query`` ``[B, H_q, T, D]``, ``key``/``value`` ``[B, H_kv, T, D]`` -> ``[B, T, H_q, D]``:
        row ``b`` attended by stream ``b``'s cache alone. ``kwargs`` (``softcap``: Gemma 2's score
        capping, whatever else the ``"vrex"`` attention function passes) go to every stream's
        ``VrexCache.attend`` unchanged, so a batched row computes what the stream computes alone."""
        if query.shape[0] != len(self.caches):
            raise ValueError(f"BatchedCache holds {len(self.caches)} streams; got a batch of {query.shape[0]}")
        outs = [cache.attend(layer, query[b:b + 1], key[b:b + 1], value[b:b + 1], scaling, **kwargs)
                for b, cache in enumerate(self.caches)]
        return torch.cat(outs, dim=0)
