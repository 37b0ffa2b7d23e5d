"""``rekv``: frame-level top-k retrieval by mean frame key, per layer (ReKV-style).

Paper: Di et al., "Streaming Video Question-Answering with In-context Video KV-Cache Retrieval"
(ReKV), ICLR 2025. As in its code: a block is one stored step (a frame; a text chunk or decoded
token is its own block), its representative key is the mean of its keys, concatenated over KV
heads; the query is the mean of the step's queries (over query tokens and the query heads of each
KV head), concatenated the same way; the top blocks by similarity are read, the same blocks for
every head of the layer (per layer, not per head).

Parameters: ``ratio`` (0.5) of the past blocks, or ``top_frames`` blocks if given (ReKV uses 64),
capped at ``max_ratio`` (0.5; the V-Rex paper caps baselines at 50%); ``similarity`` ``"dot"``
(ReKV's code) or ``"cosine"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from vrex.kv.policy import KVPolicy, Selection, Stage
from vrex.resv.grow import grow

from ._common import budget, gqa_rows, topk_stable
from .spec import check, check_budget


class _Blocks:
    """One layer's blocks: representative key, first token, length (capacity doubling: ``grow``)."""

    def __init__(self, H: int, D: int):
        self.rep = torch.zeros(64, H * D)
        self.start = torch.zeros(64, dtype=torch.int64)
        self.length = torch.zeros(64, dtype=torch.int64)
        self.n = 0

    def add(self, rep: torch.Tensor, start: int, length: int) -> None:
        self.rep, self.start, self.length = (grow(t, 0, self.n + 1) for t in (self.rep, self.start, self.length))
        self.rep[self.n], self.start[self.n], self.length[self.n] = rep, start, length
        self.n += 1


@dataclass
class ReKVPolicy(KVPolicy):
    name: ClassVar[str] = "rekv"
    offloads: ClassVar[bool] = True
    ratio: float = 0.5
    top_frames: int | None = None
    max_ratio: float = 0.5
    similarity: str = "dot"
    _blocks: list[_Blocks] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        check_budget(self.name, self.ratio, self.max_ratio, "top_frames", self.top_frames, "blocks read")
        check(self.name, "similarity", self.similarity, lambda v: v in ("dot", "cosine"), "'dot' or 'cosine'")

    def setup(self, num_layers, num_kv_heads, num_q_heads, head_dim) -> None:
        super().setup(num_layers, num_kv_heads, num_q_heads, head_dim)
        self._blocks = [_Blocks(num_kv_heads, head_dim) for _ in range(num_layers)]

    def on_append(self, layer, keys, start, frame_id) -> None:
        self._blocks[layer].add(keys.detach().float().mean(1).reshape(-1).cpu(), start, keys.shape[1])

    def on_positions_changed(self, layer, keys) -> None:
        b = self._blocks[layer]
        for i in range(b.n):  # rare (position re-indexing): a loop over blocks is fine
            s, n = int(b.start[i]), int(b.length[i])
            b.rep[i] = keys[:, s : s + n].detach().float().mean(1).reshape(-1).cpu()

    def _state(self) -> dict:
        return {"blocks": [{"rep": b.rep[: b.n].clone(), "start": b.start[: b.n].clone(), "length": b.length[: b.n].clone()}
                           for b in self._blocks]}

    def _load_state(self, state: dict) -> None:
        for b, saved in zip(self._blocks, state["blocks"], strict=True):
            b.n = 0
            for rep, start, length in zip(saved["rep"], saved["start"].tolist(), saved["length"].tolist()):
                b.add(rep, start, length)

    def select(self, layer: int, queries: torch.Tensor, n_past: int, stage: Stage) -> Selection:
        H = self.num_kv_heads
        b = self._blocks[layer]
        nb = int(torch.searchsorted(b.start[: b.n], torch.tensor([n_past]))[0]) if b.n else 0  # blocks starting < n_past
        if n_past == 0 or nb == 0:
            return Selection([torch.zeros(0, dtype=torch.int64)] * H, {"n_past": n_past, "selected": [0] * H})
        q = gqa_rows(queries.detach().float().cpu(), H).mean(1).reshape(-1)  # [H*D]
        rep = b.rep[:nb]
        if self.similarity == "cosine":
            score = F.normalize(rep, dim=-1) @ F.normalize(q, dim=0)
        else:
            score = rep @ q
        k = budget(nb, self.ratio, self.top_frames, self.max_ratio)
        chosen = topk_stable(score, k)
        starts, lens = b.start[chosen], b.length[chosen]
        lens = torch.minimum(lens, n_past - starts)
        offs = torch.arange(int(lens.sum())) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
        ids = torch.repeat_interleave(starts, lens) + offs
        return Selection([ids] * H, {"n_past": n_past, "selected": [int(ids.numel())] * H,
                                     "blocks": nb, "blocks_selected": k})
