"""Frame-rate resampling on real timestamps, and output-size arithmetic.

Kept free of PyAV so the rules can be tested on plain numbers.
"""

from __future__ import annotations

import math

# Timestamps come from integer PTS times a rational time base, converted to float; a tolerance
# of a microsecond absorbs the rounding without ever merging two real frames (no container
# has a time base coarser than that and frames closer than 1 us).
EPS = 1e-6


class Resampler:
    """Decide which decoded frames to emit for a target rate.

    Targets form a fixed grid ``start, start + 1/fps, start + 2/fps, ...``. The first frame whose
    time is at or after the pending target is emitted; the next target is then the first grid
    point strictly after that frame. Consequences, all intended:

    * a source slower than ``fps`` is never padded: each frame is emitted once, at its own time;
    * after a gap (lost data, VFR pause) emission resumes on the grid, without a burst of
      catch-up frames;
    * ``fps=None`` (or 0) emits every frame (native rate).

    Frames whose time does not advance past the last emitted one are always rejected, so
    emitted timestamps are strictly increasing even on broken streams.
    """

    def __init__(self, fps: float | None, start: float = 0.0):
        if fps is not None and fps < 0:
            raise ValueError(f"fps must be positive, 0 or None, got {fps}")
        self.period = 1.0 / fps if fps else None
        self.start = start
        self.next_t = start
        self.last_t: float | None = None

    def is_backwards(self, t: float) -> bool:
        """True if ``t`` does not advance past the last emitted frame."""
        return self.last_t is not None and t <= self.last_t + EPS

    def accept(self, t: float) -> bool:
        """Return True if the frame at time ``t`` should be emitted (and advance the grid)."""
        if self.is_backwards(t) or t < self.next_t - EPS:
            return False
        self.last_t = t
        if self.period is not None:
            k = math.floor((t + EPS - self.start) / self.period) + 1
            self.next_t = self.start + k * self.period
        return True


def scaled_size(width: int, height: int, shorter: int | None) -> tuple[int, int]:
    """Size that makes the shorter side ``shorter`` pixels, keeping the aspect ratio.

    ``None`` keeps the original size. Both up- and down-scaling happen so that the output
    size is predictable for the model; pass a value below the source size to save memory.
    """
    if shorter is None:
        return width, height
    if shorter <= 0:
        raise ValueError(f"size must be a positive number of pixels, got {shorter}")
    if width <= height:
        return shorter, max(1, round(height * shorter / width))
    return max(1, round(width * shorter / height)), shorter
