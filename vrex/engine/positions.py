"""Position ids for streams longer than the LM's trained context.

A live stream never ends, but RoPE LMs are trained up to ``max_position_embeddings`` (SmolLM2:
8192 = about 7 minutes at 2 fps x 10 tokens). Strategies (``PositionConfig.mode``):

``absolute``
    Token i gets position i. Past the trained length the model extrapolates (quality drops); for
    short streams and for comparing with one-shot prefill.
``compress`` (default)
    When the next step would pass ``max_position``, every cached token after the sink is re-indexed
    to a proportionally compressed position, ``p' = sink + (p - sink) * r`` with ``r`` chosen so the
    past fits in ``compress_to`` (default half) of the trained window, and new tokens continue from
    there. Keys are cached post-RoPE, and a RoPE rotation by ``p`` followed by one by ``p' - p``
    equals a rotation by ``p'``, so re-indexing is one elementwise rotation of the stored keys
    (``rerotate``, per layer with the layer's own RoPE: ``VrexCache.reindex``), done once per ``max_position * (1 - compress_to)`` tokens: amortised O(1) per
    step. Recent tokens keep fine positional resolution, old ones are squeezed (like position
    interpolation, applied only to the past). Relative order is preserved.

``spread`` (compress only): the layers move over this many steps instead of one, so no single frame
pays for re-rotating the whole cache (an hour in, one re-index was 2.8-6.2 s: the frames over the
500 ms real-time budget). Until a layer has moved it stays in the old frame: the step's queries and
keys are turned into it (``VrexCache.begin_reindex``), so it computes what it computed before. The
re-index then begins ``spread - 1`` steps early, so the old frame still has room for the steps it
waits; a step that would take the old frame past ``max_position`` moves every layer left at once.
The session takes at most one step per layer, and fewer when ``max_position`` leaves little room
(``StreamingSession._reindex_spread``). Default 32: one layer per frame for LMs of up to 32 layers
(SmolLM2: 30; at 90K cached tokens one layer's move is 40-60 ms over the tiers, two were 80-300 ms
in an hour's run, and frames over 500 ms came from them). The re-index begins once fewer than 30
frames (390 tokens) of the 8192-token window are left.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vrex.kv.layers import rerotate, rotate_half  # noqa: F401  (re-exported: the RoPE knowledge lives with the layers)


@dataclass
class PositionConfig:
    mode: str = "compress"
    max_position: int | None = None  # None: the LM's max_position_embeddings
    compress_to: float = 0.5
    spread: int = 32  # steps over which the layers move (1: all at once; see the module docstring)

    def __post_init__(self) -> None:
        if self.mode not in ("absolute", "compress"):
            raise ValueError(f"position mode '{self.mode}' is not one of: absolute, compress")
        if not 0.0 < self.compress_to < 1.0:
            raise ValueError(f"compress_to must be in (0, 1), got {self.compress_to}")
        if isinstance(self.spread, bool) or not isinstance(self.spread, int) or self.spread < 1:
            raise ValueError(f"spread must be an integer >= 1 (steps over which the layers move), got {self.spread!r}")


def compressed_positions(positions: torch.Tensor, sink: int, target_end: int) -> torch.Tensor:
    """Map positions after ``sink`` linearly into ``[sink, target_end)``, preserving order."""
    out = positions.clone()
    tail = positions >= sink
    if tail.any():
        span = float(positions[tail].max() - sink + 1)
        scale = (target_end - sink) / span
        out[tail] = sink + torch.floor((positions[tail] - sink).to(torch.float64) * scale).to(positions.dtype)
    return out
