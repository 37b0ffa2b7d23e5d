"""``full``: every past token, everything on the device tier (the dense-attention reference).

Paper: none (the VideoLLM-online baseline: one continuous KV cache, never evicted). No parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vrex.kv.policy import KVPolicy, Selection, Stage


@dataclass
class FullPolicy(KVPolicy):
    name: ClassVar[str] = "full"
    offloads: ClassVar[bool] = False

    def select(self, layer: int, queries: torch.Tensor, n_past: int, stage: Stage) -> Selection:
        return Selection(indices=None, stats={"n_past": n_past, "selected": [n_past] * self.num_kv_heads})
