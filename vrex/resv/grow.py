"""The one capacity-doubling helper of the growing per-layer buffers (ReSV's HC table, the
InfiniGen key copy, ReKV's block table)."""

from __future__ import annotations

import math

import torch


def grow(t: torch.Tensor, dim: int, need: int, fill=0, *, factor: float = 2.0) -> torch.Tensor:
    """``t`` itself when its ``dim`` holds ``need`` entries, else a copy with capacity
    ``max(need, ceil(factor * capacity), 16)`` along ``dim`` (amortised O(1) appends for any
    ``factor > 1``; a smaller factor copies more often and leaves a smaller unused tail), the new
    entries ``fill``."""
    if factor <= 1:
        raise ValueError(f"grow factor must be > 1, got {factor}")
    cap = t.shape[dim]
    if need <= cap:
        return t
    shape = list(t.shape)
    shape[dim] = max(need, math.ceil(factor * cap), 16)
    out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    out.narrow(dim, 0, cap).copy_(t)
    return out
