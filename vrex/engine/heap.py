"""Keeping the C allocator's free pages out of RSS during a long stream (issue 18, item 3).

A stream's per-step temporaries grow with its length (selected ids, plans, score rows). glibc serves
a large block from its own mapping, but once such a block is freed it raises its threshold for new
mappings to that size (up to 32 MB), so later blocks of that size come from the heap; when they are
freed the heap keeps their pages. `vrex bench soak` measured this: with `full` over the tiers the
allocator's free bytes grew from 72 to 138 MiB over 15 stream minutes, most of the RSS growth.
Two remedies, both process-wide:

* :func:`fix_mmap_threshold` (once, when a session starts): blocks from ``MMAP_THRESHOLD`` (1 MiB) up
  always get their own mapping, returned to the system when freed. A fixed threshold turns glibc's
  raising off. The stream's big temporaries (every layer's keys read back when positions are
  re-indexed: 21 MB per layer at 28K tokens) then never settle in the heap. The price: a frame
  step's own temporaries of 1 MB or more (logits, per-token maps) are mapped afresh every step
  (see ``MMAP_THRESHOLD``).
* :func:`release_free_heap` (after steps, at most every ``TRIM_INTERVAL_S`` of wall time):
  ``malloc_trim(0)`` hands every whole free page of the heap back (``madvise(MADV_DONTNEED)``; the
  memory stays the allocator's to reuse, the kernel no longer backs it). It walks the free lists,
  so not per step.

Not glibc (macOS, musl): nothing to call, both return False.
"""

from __future__ import annotations

import ctypes
import os
import re
import time

#: Wall seconds between two trims: a minute of a 2 fps stream is 120 steps.
TRIM_INTERVAL_S = 30.0


#: Blocks of at least this many bytes get their own mapping (see the module docstring). The
#: environment variable ``VREX_MMAP_THRESHOLD`` (bytes, read when a session starts) overrides it; 0
#: leaves glibc's own threshold. Its price, measured once (2 cores, `full` and `resv` over the tiers at
#: 9K cached tokens, one pair of runs beside a 1-thread soak): frame steps 8-9% slower (454 / 392 ms
#: against 422 / 360), the page faults of fresh mappings for the step's 1-8 MB temporaries (logits,
#: per-token maps). The largest ones, `full`'s attention scores (7 MB per layer at 16K tokens, which
#: made its frame step 1.5x slower: 380 against 247 ms), now go into a scratch the cache reuses
#: (``vrex.kv.cache._attention``).
MMAP_THRESHOLD = 1 << 20
#: glibc refuses a larger fixed threshold (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit systems).
MMAP_THRESHOLD_MAX = 32 << 20
ENV = "VREX_MMAP_THRESHOLD"


def mmap_threshold_error(text: str | None) -> str | None:
    """What is wrong with a ``VREX_MMAP_THRESHOLD`` value (None: unset or fine). The CLI checks it with
    the other options, before anything loads."""
    if text is None:
        return None
    if not re.fullmatch(r"\s*[0-9]+\s*", text) or int(text) > MMAP_THRESHOLD_MAX:
        return (f"environment variable {ENV}={text!r}: give a whole number of bytes from 0 (glibc's own "
                f"threshold) to {MMAP_THRESHOLD_MAX} (glibc's largest)")
    return None


def mmap_threshold() -> int:
    """The threshold to fix: ``VREX_MMAP_THRESHOLD`` if set, else ``MMAP_THRESHOLD``; a bad value raises
    ``ValueError`` with the message of :func:`mmap_threshold_error`."""
    text = os.environ.get(ENV)
    error = mmap_threshold_error(text)
    if error:
        raise ValueError(error)
    return MMAP_THRESHOLD if text is None else int(text)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)

_last_trim = time.monotonic()
_threshold_fixed = False
try:
    _libc = ctypes.CDLL(None)
    _trim, _mallopt = _libc.malloc_trim, _libc.mallopt
    _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
    _mallopt.argtypes, _mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
except (OSError, AttributeError):  # not glibc
    _trim = _mallopt = None


def fix_mmap_threshold() -> bool:
    """Fix glibc's mapping threshold at :func:`mmap_threshold` (once per process); True if it is fixed."""
    global _threshold_fixed
    if _mallopt is None or _threshold_fixed:
        return _threshold_fixed
    threshold = mmap_threshold()
    if threshold > 0:
        _threshold_fixed = _mallopt(_M_MMAP_THRESHOLD, threshold) == 1
    return _threshold_fixed


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


__all__ = ["ENV", "MMAP_THRESHOLD", "MMAP_THRESHOLD_MAX", "TRIM_INTERVAL_S", "fix_mmap_threshold", "mmap_threshold",
           "mmap_threshold_error", "release_free_heap"]
