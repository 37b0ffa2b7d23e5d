"""``streamingllm``: attention sinks plus a recent window; everything else is evicted for good.

Paper: Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024.
Parameters: ``sink`` (first tokens kept; the paper uses 4), ``window`` (most recent past tokens
kept), ``evict`` (default true). Tokens in ``[sink, n - window)`` are returned by ``evictable`` once
and the store drops them. With ``evict=false`` the same tokens are read (sinks plus the window) but
the store keeps everything: attention in linear time over a complete cache, which ``vrex bench
stream`` uses to fill long contexts fast before forking other policies from it.
Not an offloading method (``offloads=False``). Positions are not re-assigned inside the cache
(the paper's cache-relative positions are the engine's business).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from vrex.kv.policy import KVPolicy, Selection, Stage

from .spec import check, integer_at_least


@dataclass
class StreamingLLMPolicy(KVPolicy):
    name: ClassVar[str] = "streamingllm"
    offloads: ClassVar[bool] = False
    sink: int = 4
    window: int = 1020
    evict: bool = True
    _frontier: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        for param in ("sink", "window"):
            check(self.name, param, getattr(self, param), integer_at_least(0), "an integer >= 0 (tokens)")

    def setup(self, num_layers, num_kv_heads, num_q_heads, head_dim) -> None:
        super().setup(num_layers, num_kv_heads, num_q_heads, head_dim)
        self._frontier = [self.sink] * num_layers

    def _state(self) -> dict:
        return {"frontier": list(self._frontier)}

    def _load_state(self, state: dict) -> None:
        self._frontier = [int(x) for x in state["frontier"]]

    def select(self, layer: int, queries: torch.Tensor, n_past: int, stage: Stage) -> Selection:
        lo = max(min(self.sink, n_past), n_past - self.window)
        ids = torch.cat([torch.arange(min(self.sink, n_past)), torch.arange(lo, n_past)])
        return Selection([ids] * self.num_kv_heads, {"n_past": n_past, "selected": [int(ids.numel())] * self.num_kv_heads})

    def evictable(self, layer: int, n_total: int) -> torch.Tensor | None:
        if not self.evict:
            return None
        hi = n_total - self.window
        lo = self._frontier[layer]
        if hi <= lo:
            return None
        self._frontier[layer] = hi
        return torch.arange(lo, hi)
