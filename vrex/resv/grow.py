"""The one capacity-doubling helper of the growing per-layer buffers (ReSV's HC table, the
InfiniGen key copy, ReKV's block table)."""

from __future__ import annotations

import torch


def grow(t: torch.Tensor, dim: int, need: int, fill=0) -> torch.Tensor:
    """``t`` itself when its ``dim`` holds ``need`` entries, else a copy with capacity
    ``max(need, 2 * capacity, 16)`` along ``dim`` (amortised O(1) appends), the new entries ``fill``."""
    cap = t.shape[dim]
    if need <= cap:
        return t
    shape = list(t.shape)
    shape[dim] = max(need, 2 * cap, 16)
    out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    out.narrow(dim, 0, cap).copy_(t)
    return out
