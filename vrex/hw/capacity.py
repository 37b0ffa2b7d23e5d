"""Device-memory capacity: what fits at a batch and KV length, what spills, over which link.

Device DRAM (Table I) holds, in order: the runtime/OS reserve (``hardware/*.yaml`` ``reserve_gb``),
the weights (LM + frame encoder), then KV. Retrieval methods (FlexGen and every predictor) keep the
recent ``device_window_tokens`` per stream on the device -- the paper's "predefined maximum
capacity" is unstated; what it does state is that clustering runs on the recent cache and never on
offloaded KV, so the window is the clustering scope (32 frames x 10 tokens) -- and offload older
tokens to the tier of Table I, as the paper's baselines do. ``device_first`` methods (the Oaken-like
quantised baseline) keep everything on the device while the whole batch fits in the free memory
and spill the excess (per stream: free memory / batch). Either way the device share never exceeds
the free memory, so larger batches and longer KV spill more.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Constants, Hardware, Method
from .model_shapes import ModelShape

GB = 1e9


@dataclass(frozen=True)
class Placement:
    """Where one stream's KV lives (all streams of a batch alike)."""

    free_bytes: float  # device memory left for KV after reserve and weights (all streams)
    budget_bytes: float  # KV bytes the method keeps on the device (all streams)
    kv_token_bytes: float  # stored bytes of one token (all layers), after quantisation
    device_tokens: int  # per stream
    offloaded_tokens: int  # per stream, in the offload tier
    fits: bool  # the whole batch's KV fits in free device memory

    @property
    def spills(self) -> bool:
        return self.offloaded_tokens > 0


def weight_bytes(model: ModelShape) -> float:
    vis = model.vision.params * model.bytes_per_param if model.vision is not None else 0.0
    return model.weight_bytes + model.vocab_size * model.hidden_size * model.bytes_per_param * (not model.tie_word_embeddings) + vis


def free_bytes(hw: Hardware, model: ModelShape) -> float:
    """Device memory left for KV (may be negative: the weights do not fit)."""
    return hw.dram_bytes - hw.reserve_bytes - weight_bytes(model)


def place(hw: Hardware, method: Method, model: ModelShape, batch: int, kv_tokens: int, c: Constants) -> Placement:
    tok = model.kv_bytes_per_token * method.kv_bits / (8 * model.bytes_per_param)
    free = max(0.0, free_bytes(hw, model))
    budget = free if method.device_first else min(free, batch * c.get("device_window_tokens", 0.0) * tok)
    per_stream = int(budget / (batch * tok)) if tok > 0 else kv_tokens
    dev = min(kv_tokens, per_stream)
    return Placement(free, budget, tok, dev, kv_tokens - dev, batch * kv_tokens * tok <= free)


__all__ = ["Placement", "weight_bytes", "free_bytes", "place", "GB"]
