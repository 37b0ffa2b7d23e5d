"""vrex.engine.heap: free pages in the middle of the C heap go back to the system (RSS drops), at most
once per interval unless forced; with the mapping threshold fixed, freed big blocks leave RSS at once."""

from __future__ import annotations

import ctypes

import pytest

from vrex.engine import heap


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(heap._trim is None, reason="not glibc: no malloc_trim")
def test_free_heap_pages_are_released_and_trims_are_spaced():
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    block, n = 64 * 1024, 2400  # below glibc's mapping threshold: from the heap, 150 MB touched
    blocks = [libc.malloc(block) for _ in range(n)]
    for p in blocks:
        libc.memset(p, 1, block)
    heap.release_free_heap(force=True)
    # free all but every 64th block: the heap cannot shrink from its top, its middle is free
    keep = blocks[::64]
    for i, p in enumerate(blocks):
        if i % 64:
            libc.free(p)
    before = _rss_anon()
    assert heap.release_free_heap(force=True)
    after = _rss_anon()
    assert before - after > 100 * 2**20, (before, after)
    assert not heap.release_free_heap()  # within TRIM_INTERVAL_S of the last one: not again
    for p in keep:
        libc.free(p)


def _libc():
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    return libc


@pytest.mark.skipif(heap._mallopt is None, reason="not glibc: no mallopt")
def test_freed_big_blocks_leave_rss_without_a_trim():
    """Blocks of 2 MiB, freed, no trim: with glibc's own (raised) threshold they would settle in the heap
    behind a live block; fixed at 1 MiB each has its own mapping and is returned when freed."""
    assert heap.fix_mmap_threshold()
    libc = _libc()
    size = 2 * 2**20
    first = libc.malloc(size)  # freed first: with a dynamic threshold, this raises it past 2 MiB
    libc.memset(first, 1, size)
    libc.free(first)
    blocks = [libc.malloc(size) for _ in range(64)]
    for p in blocks:
        libc.memset(p, 1, size)
    pin = libc.malloc(64 * 1024)
    before = _rss_anon()
    for p in blocks:
        libc.free(p)
    after = _rss_anon()
    assert before - after > 100 * 2**20, (before, after)
    libc.free(pin)
