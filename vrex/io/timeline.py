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

That repair is only right when the timestamps are the guesses (``decode_order=True``). A container
that stores each frame's presentation time (MP4, Matroska/WebM, MPEG-TS, ...) gives right
timestamps, and there it is the decoder's order that can be wrong: past packets it had to drop, an
H.264 decoder emits some frames late (damaged ``chaplin.mp4``: PTS 0.48, 1.76, 0.52, 1.80, ...).
Handing out the smallest timestamp would give the late 0.52 s picture the 1.76 s one and the
1.76 s picture 0.52 s. So by default every frame keeps its own timestamp, and the window instead
lets frames leave in timestamp order: a frame up to REORDER_DEPTH places late is put back in its
place, a later one leaves behind its successors and is dropped downstream as going back in time.
On an undamaged stream the decoder's order is already the timestamps' order: no change.
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
    ``decode_order``: the container stores no presentation times (AVI), so the timestamps are
    FFmpeg's guesses and only their sorted order is trusted; otherwise each item keeps its own.
    """

    def __init__(self, period: Fraction, origin: Fraction | None = None, *, decode_order: bool = False):
        self.period = period
        self.origin = origin  # absolute time of t = 0 (the first frame's, unless a seek fixed it)
        self.decode_order = decode_order
        self.offset = Fraction(0)  # added to every time; moved on by rebase() after a live reconnect
        # Min-heap of the waiting items: (timestamp, arrival number, item); the number keeps ties
        # in arrival order and spares comparing items.
        self.window: list[tuple[Fraction, int, T]] = []
        self.arrived: deque[T] = deque()  # the waiting items in decoder order (decode_order only)
        self.pushed = 0
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
        heapq.heappush(self.window, (stamp, self.pushed, item))
        self.pushed += 1
        if self.decode_order:
            self.arrived.append(item)
        depth = REORDER_DEPTH if reorder else 0
        ready = []
        while len(self.window) > depth:
            ready.append(self._release())
        return ready

    def drain(self) -> list[tuple[float, T]]:
        return [self._release() for _ in range(len(self.window))]

    def rebase(self, next_t: float) -> None:
        """A new timestamp space starts (a live stream re-opened): its first frame will be at ``next_t``."""
        assert not self.window, "drain() before rebase()"
        self.origin, self.newest, self.last_abs = None, None, None
        self.offset = Fraction(next_t)

    def _release(self) -> tuple[float, T]:
        # The smallest timestamp leaves, with its own item; or, when the timestamps are decode-order
        # guesses, with the oldest item (the pictures keep the decoder's order).
        stamp, _, item = heapq.heappop(self.window)
        if self.decode_order:
            item = self.arrived.popleft()
        if self.origin is None or (self.last_abs is None and stamp < self.origin):
            # A first frame before the declared start (a container that declares it wrong) is t = 0:
            # times never go negative.
            self.origin = stamp
        self.last_abs = stamp
        self.last = float(self.offset + stamp - self.origin)
        return self.last, item
