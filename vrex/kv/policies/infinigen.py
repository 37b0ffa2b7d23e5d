"""``infinigen``: token-level top-k per KV head by predicted attention (InfiniGen / InfiniGen-P).

Paper: Lee et al., "InfiniGen: Efficient Generative Inference of Large Language Models with
Dynamic KV Cache Management", OSDI 2024; "InfiniGen-P" (also in prefill) is the V-Rex paper's
variant, with every baseline capped at 50% of the tokens.

Parameters:

* ``ratio`` (0.5): fraction of past tokens each KV head keeps, or ``budget`` tokens if given;
  always capped at ``max_ratio`` (0.5) of the past, at least one token.
* ``prefill`` (True = InfiniGen-P): select in ``frame``/``text`` steps too; False = the original
  InfiniGen, which reads everything in prefill and selects only in ``decode``.
* ``aggregate``: how the rows of a step (every query token of every query head sharing the KV
  head) vote: ``"softmax_sum"`` (default: sum over rows of ``softmax(q.k / sqrt(D))``, i.e. the
  attention mass each token would receive) or ``"max_logit"`` (max over rows of ``q.k``).

Simplification: InfiniGen predicts with partial (SVD-skewed) query/key channels in the previous
layer; this baseline scores with the full post-RoPE ``q.k`` of the current layer, an upper bound on
its prediction quality (its cost is the same token-level scan).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from vrex.kv.policy import KVPolicy, Selection, Stage

from ._common import KeyBuffer, budget, gqa_rows, topk_stable
from .spec import check, check_budget


@dataclass
class InfiniGenPolicy(KVPolicy):
    name: ClassVar[str] = "infinigen"
    offloads: ClassVar[bool] = True
    ratio: float = 0.5
    budget: int | None = None
    max_ratio: float = 0.5
    prefill: bool = True
    aggregate: str = "softmax_sum"
    _keys: list[KeyBuffer] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        check_budget(self.name, self.ratio, self.max_ratio, "budget", self.budget, "tokens per KV head")
        check(self.name, "aggregate", self.aggregate, lambda v: v in ("softmax_sum", "max_logit"), "'softmax_sum' or 'max_logit'")

    def setup(self, num_layers, num_kv_heads, num_q_heads, head_dim) -> None:
        super().setup(num_layers, num_kv_heads, num_q_heads, head_dim)
        self._keys = [KeyBuffer(num_kv_heads, head_dim) for _ in range(num_layers)]

    def on_append(self, layer, keys, start, frame_id) -> None:
        self._keys[layer].append(keys, start)

    def on_positions_changed(self, layer, keys) -> None:
        self._keys[layer].replace(keys)

    def _state(self) -> dict:
        return {"keys": [b.view().clone() for b in self._keys]}

    def _load_state(self, state: dict) -> None:
        for buf, keys in zip(self._keys, state["keys"], strict=True):
            buf.replace(keys)

    def select(self, layer: int, queries: torch.Tensor, n_past: int, stage: Stage) -> Selection:
        H = self.num_kv_heads
        if n_past == 0:
            return Selection([torch.zeros(0, dtype=torch.int64)] * H, {"n_past": 0, "selected": [0] * H})
        if stage != "decode" and not self.prefill:
            return Selection(None, {"n_past": n_past, "selected": [n_past] * H})
        k = budget(n_past, self.ratio, self.budget, self.max_ratio)
        keys = self._keys[layer].view(n_past)
        rows = gqa_rows(queries.detach().float().cpu(), H)
        R = rows.shape[1]
        step = max(1, (1 << 21) // max(1, H * n_past))  # row chunks: bounded memory for long prefills
        score = torch.zeros(H, n_past) if self.aggregate == "softmax_sum" else torch.full((H, n_past), float("-inf"))
        for r0 in range(0, R, step):
            logits = torch.bmm(rows[:, r0 : r0 + step], keys.transpose(1, 2))  # [H, r, N]
            if self.aggregate == "softmax_sum":
                score += torch.softmax(logits / math.sqrt(self.head_dim), dim=-1).sum(1)
            else:
                score = torch.maximum(score, logits.amax(1))
        idx = topk_stable(score, k)
        return Selection(list(idx.unbind(0)), {"n_past": n_past, "selected": [k] * H, "dot_products": [R * n_past] * H})
