"""Presentation times for decoded frames, in the order the decoder outputs them.

Decoders output frames in presentation order, but the timestamps attached to them are the
container's and can be permuted. AVI stores no timestamps at all: FFmpeg's AVI demuxer guesses
each packet's PTS from its chunk index and the codec's B-frame delay. For DivX/XviD "packed
B-frames" (a P- and a B-frame in one chunk, then a 7-byte placeholder) that guess is wrong, and
the frames of ``Megamind.avi`` come out of the decoder, correctly ordered, carrying PTS
1, 2, 3, 5, 4, 6, 8, 7, ... Taken literally, every third frame "goes back in time" and was
dropped (182 of 270 frames kept).

The fix is FFmpeg's own remedy, generalised: frames wait in a short window and each frame that
leaves takes the smallest timestamp in the window. That sorts the timestamps back into order
(1, 2, 3, 4, 5, ...) while the pictures stay in the decoder's order, and it is the identity on
streams whose timestamps are already right. Only decoders that reorder (``has_b_frames``) get
a window, so intra-only and low-delay live streams gain no latency.
"""

from __future__ import annotations

import heapq
from collections import deque
from fractions import Fraction
from typing import Generic, TypeVar

T = TypeVar("T")

#: Frames held back to put permuted timestamps in order. Packed B-frames swap neighbours
#: (a displacement of 1 per B-frame in a row); encoders emit at most 4 B-frames in a row for
#: MPEG-4 Part 2 (XviD's maximum), so 4 slots cover every packed stream.
REORDER_DEPTH = 4


class Timeline(Generic[T]):
    """Assign seconds-since-first-frame to items pushed in decoder output order.

    ``push(item, seconds, reorder)`` takes the item's own timestamp (absolute seconds, exact
    Fraction; None if the container gave none) and returns the items now ready, each with its
    time. ``drain()`` releases the rest at the end of the input or before a reconnection.
    """

    def __init__(self, period: Fraction, origin: Fraction | None = None):
        self.period = period
        self.origin = origin  # absolute time of t = 0 (the first frame's, unless a seek fixed it)
        self.offset = Fraction(0)  # added to every time; moved on by rebase() after a live reconnect
        self.waiting: deque[T] = deque()
        self.stamps: list[Fraction] = []  # min-heap of the waiting items' timestamps
        self.newest: Fraction | None = None  # largest timestamp pushed so far
        self.last_abs: Fraction | None = None  # absolute timestamp of the last released item
        self.last: float | None = None  # its time in seconds (what Frame.t says)
        self.untimed = 0  # items that came without any timestamp

    def push(self, item: T, stamp: Fraction | None, reorder: bool) -> list[tuple[float, T]]:
        if stamp is None:
            # No timestamp (raw elementary streams, a decoder's last flushed frame): one period
            # after the newest, so the frame keeps its place and is never merged with another.
            self.untimed += 1
            stamp = Fraction(0) if self.newest is None else self.newest + self.period
        self.newest = stamp if self.newest is None else max(self.newest, stamp)
        self.waiting.append(item)
        heapq.heappush(self.stamps, stamp)
        depth = REORDER_DEPTH if reorder else 0
        ready = []
        while len(self.waiting) > depth:
            ready.append(self._release())
        return ready

    def drain(self) -> list[tuple[float, T]]:
        return [self._release() for _ in range(len(self.waiting))]

    def rebase(self, next_t: float) -> None:
        """A new timestamp space starts (a live stream re-opened): its first frame will be at ``next_t``."""
        assert not self.waiting, "drain() before rebase()"
        self.origin, self.newest, self.last_abs = None, None, None
        self.offset = Fraction(next_t)

    def _release(self) -> tuple[float, T]:
        item = self.waiting.popleft()
        stamp = heapq.heappop(self.stamps)
        if self.origin is None:
            self.origin = stamp
        self.last_abs = stamp
        self.last = float(self.offset + stamp - self.origin)
        return self.last, item
