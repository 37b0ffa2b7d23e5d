"""Giving the C allocator's free pages back to the system during a long stream (issue 18, item 3).

A stream's per-step temporaries grow with its length (selected ids, plans, score rows). glibc serves
a large block from its own mapping, but once such a block is freed it raises its threshold for new
mappings to that size (up to 32 MB), so later blocks of that size come from the heap; when they are
freed the heap keeps their pages. `vrex bench soak` measured this: with `full` over the tiers the
allocator's free bytes grew from 72 to 138 MiB over 15 stream minutes, most of the RSS growth.
``malloc_trim(0)`` hands every whole free page back (``madvise(MADV_DONTNEED)``; the memory stays
the allocator's to reuse, the kernel no longer backs it). It walks the free lists, so it runs at most
every ``TRIM_INTERVAL_S`` seconds of wall time, not per step.

Not glibc (macOS, musl): nothing to call, :func:`release_free_heap` returns False.
"""

from __future__ import annotations

import ctypes
import time

#: Wall seconds between two trims: a minute of a 2 fps stream is 120 steps.
TRIM_INTERVAL_S = 30.0

_last_trim = time.monotonic()
_trim = None
try:
    _trim = ctypes.CDLL(None).malloc_trim
    _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
except (OSError, AttributeError):  # not glibc
    _trim = None


def release_free_heap(force: bool = False) -> bool:
    """``malloc_trim(0)`` if ``TRIM_INTERVAL_S`` passed since the last one (or ``force``); True if it ran."""
    global _last_trim
    if _trim is None:
        return False
    now = time.monotonic()
    if not force and now - _last_trim < TRIM_INTERVAL_S:
        return False
    _last_trim = now
    _trim(0)
    return True


__all__ = ["TRIM_INTERVAL_S", "release_free_heap"]
