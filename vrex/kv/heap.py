"""The C heap of a long session: free pages go back to the OS as the stream grows (issue 18).

Every step allocates temporaries whose size grows with the cached tokens (the gathered K/V of a
selection, attention scores, ReSV's mean keys). glibc serves blocks below its (dynamic, up to
32 MiB) mmap threshold from the heap, and a heap only shrinks from its top: blocks freed below a
live one stay with the process. With temporaries that grow a little at every step those free pages
grew with the stream: ``vrex bench soak`` (resv) showed the allocator's free bytes going from 87 to
206 MiB between stream minutes 3 and 15.

:class:`HeapTrimmer` calls glibc's ``malloc_trim(0)`` once per ``TRIM_EVERY`` bytes of K/V appended:
it returns the whole pages inside every free block (``MADV_DONTNEED``; the blocks stay free and
reusable, a reuse faults the pages in again), about once a stream minute at 2 fps. Tried first and
dropped: a fixed 1 MiB mmap threshold (every large block unmapped when freed) bounded the free
heap too, but doubled the vision encoder's time (9 frames: 182 -> 353 ms, 8 MiB: 287 ms): its
constant-size activations were mapped and faulted in afresh at every call.
:class:`vrex.kv.store.KVStore` uses a trimmer when it has a disk tier (a session meant to run for hours).
"""

from __future__ import annotations

import ctypes

#: K/V bytes appended between two trims (all layers). At 2 fps the default model appends ~70 MiB a minute.
TRIM_EVERY = 64 << 20


def trim() -> bool:
    """Return the free heap pages of every glibc arena to the OS; False where there is no ``malloc_trim``
    (not glibc) or nothing was returned."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    fn.argtypes, fn.restype = (ctypes.c_size_t,), ctypes.c_int
    return fn(0) == 1


class HeapTrimmer:
    """Counts appended bytes and trims the heap (:func:`trim`) once per ``every`` of them."""

    def __init__(self, every: int = TRIM_EVERY) -> None:
        self.every, self.pending, self.trims = every, 0, 0

    def note(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= self.every:
            self.pending = 0
            self.trims += 1
            trim()


__all__ = ["TRIM_EVERY", "HeapTrimmer", "trim"]
