"""Small helpers shared by the policies (not a policy)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vrex.resv.grow import grow


def gqa_rows(queries: Tensor, num_kv_heads: int) -> Tensor:
    """``[H_q, T_q, D]`` -> ``[H_kv, G*T_q, D]``: the rows of every query head sharing a KV head.

    Query head ``i`` uses KV head ``i // G`` (``G = H_q / H_kv``), transformers' ``repeat_kv`` order.
    """
    hq, tq, d = queries.shape
    if hq % num_kv_heads:
        raise ValueError(f"{hq} query heads are not a multiple of {num_kv_heads} KV heads")
    g = hq // num_kv_heads
    return queries.reshape(num_kv_heads, g * tq, d)


def all_indices(n_past: int, num_kv_heads: int) -> list[Tensor]:
    ids = torch.arange(n_past)
    return [ids] * num_kv_heads


def budget(n_past: int, ratio: float, count: int | None, max_ratio: float | None) -> int:
    """Items to keep out of ``n_past``: ``count`` if given else ``ceil(ratio * n_past)``, capped at
    ``floor(max_ratio * n_past)`` (at least 1 when ``n_past > 0``)."""
    k = count if count is not None else math.ceil(ratio * n_past)
    if max_ratio is not None:
        k = min(k, math.floor(max_ratio * n_past))
    return max(1, min(k, n_past)) if n_past else 0


def topk_stable(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest entries along the last dim, ties to the lower index, returned sorted."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :k]
    return order.sort(dim=-1).values


class KeyBuffer:
    """Amortised-growth copy of one layer's keys ``[H, N, D]`` (capacity doubling: ``grow``)."""

    def __init__(self, num_kv_heads: int, head_dim: int):
        self.buf = torch.zeros(num_kv_heads, 64, head_dim)
        self.n = 0

    def append(self, keys: Tensor, start: int) -> None:
        T = keys.shape[1]
        if start != self.n:
            raise ValueError(f"keys expected at {self.n}, got start={start}")
        self.buf = grow(self.buf, 1, self.n + T)
        self.buf[:, self.n : self.n + T] = keys.detach().to(torch.float32).cpu()
        self.n += T

    def replace(self, keys: Tensor) -> None:
        self.buf = keys.detach().to(torch.float32).cpu().clone()
        self.n = keys.shape[1]

    def view(self, n: int | None = None) -> Tensor:
        return self.buf[:, : self.n if n is None else n]
