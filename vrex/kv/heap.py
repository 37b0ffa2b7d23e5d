"""The C heap of a long session: large temporaries go back to the OS when freed (issue 18).

Every step allocates temporaries whose size grows with the cached tokens (the gathered K/V of a
selection, attention scores, ReSV's mean keys). glibc serves blocks below its mmap threshold from
the heap, and that threshold is dynamic: each freed mmapped block raises it (up to 32 MiB), so after
the first few steps every temporary comes from the heap. A heap only shrinks from its top, and
blocks freed below a live one stay with the process as free pages; with temporaries that grow a
little at every step, those pages grew with the stream. ``vrex bench soak`` (resv, 7 stream
minutes, 1 thread): the allocator's free bytes went 103 -> 180 MiB after the budgets filled; with a
fixed 1 MiB threshold 21 -> 44 MiB, and RSS was 100 MiB lower from the first minute on.

:func:`bound_heap` sets that fixed threshold once per process; :class:`vrex.kv.store.KVStore` calls it
when it has a disk tier (a session meant to run for hours). A threshold the user set
(``MALLOC_MMAP_THRESHOLD_`` or ``glibc.malloc.mmap_threshold`` in ``GLIBC_TUNABLES``) is kept.
"""

from __future__ import annotations

import ctypes
import os

#: Blocks from this size on are mmapped (and unmapped when freed). Below it the heap's holes are small.
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
_applied: bool | None = None


def bound_heap() -> bool:
    """Serve allocations of ``MMAP_THRESHOLD`` bytes or more with mmap from now on (once per process).

    True when set (now or before); False where it does not apply: not glibc, or the user chose a
    threshold through the environment."""
    global _applied
    if _applied is None:
        _applied = _set_threshold()
    return _applied


def _set_threshold() -> bool:
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): their allocators decide
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


__all__ = ["MMAP_THRESHOLD", "bound_heap"]
