"""``flexgen``: everything offloaded, everything fetched every step.

Paper: Sheng et al., "FlexGen: High-Throughput Generative Inference of Large Language Models with a
Single GPU", ICML 2023 (the V-Rex paper's offload baseline). No parameters: the store's budgets
decide what is offloaded; the policy reads all past tokens, so the whole offloaded KV crosses the link.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vrex.kv.policy import KVPolicy, Selection, Stage


@dataclass
class FlexGenPolicy(KVPolicy):
    name: ClassVar[str] = "flexgen"
    offloads: ClassVar[bool] = True

    def select(self, layer: int, queries: torch.Tensor, n_past: int, stage: Stage) -> Selection:
        return Selection(indices=None, stats={"n_past": n_past, "selected": [n_past] * self.num_kv_heads})
