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


_BIG_BLOCKS = """
import ctypes, sys
from vrex.engine import heap
fixed = heap.fix_mmap_threshold()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def rss_anon():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon:"))
size = 2 * 2**20
first = libc.malloc(size)  # freed first: with glibc's own threshold this raises it past 2 MiB
libc.memset(first, 1, size)
libc.free(first)
blocks = [libc.malloc(size) for _ in range(64)]
for p in blocks:
    libc.memset(p, 1, size)
pin = libc.malloc(64 * 1024)
before = rss_anon()
for p in blocks:
    libc.free(p)
print(fixed, before - rss_anon())
"""


@pytest.mark.skipif(heap._mallopt is None, reason="not glibc: no mallopt")
@pytest.mark.parametrize("threshold", ["1048576", "0"])
def test_freed_big_blocks_leave_rss_without_a_trim(threshold):
    """Blocks of 2 MiB, freed, no trim, in a fresh process (a heap with free room of its own would serve
    them whatever the threshold): with the threshold fixed at 1 MiB each has its own mapping and leaves
    RSS when freed; with glibc's own (VREX_MMAP_THRESHOLD=0, raised by the first free) they stay."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "VREX_MMAP_THRESHOLD": threshold}
    out = subprocess.run([sys.executable, "-c", _BIG_BLOCKS], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-1000:]
    fixed, released = out.stdout.split()
    if threshold == "0":
        assert fixed == "False" and int(released) < 16 * 2**20, released
    else:
        assert fixed == "True" and int(released) > 100 * 2**20, released


@pytest.mark.parametrize("text", ["abc", "-1", "1.5", "1e6", "", "²", str(heap.MMAP_THRESHOLD_MAX + 1)])
def test_bad_threshold_is_refused_naming_the_variable(monkeypatch, text):
    monkeypatch.setenv(heap.ENV, text)
    assert heap.ENV in heap.mmap_threshold_error(text)
    with pytest.raises(ValueError, match=heap.ENV):
        heap.mmap_threshold()


@pytest.mark.parametrize("text, value", [(None, heap.MMAP_THRESHOLD), ("0", 0), (" 4096 ", 4096),
                                         (str(heap.MMAP_THRESHOLD_MAX), heap.MMAP_THRESHOLD_MAX)])
def test_threshold_from_the_environment(monkeypatch, text, value):
    if text is None:
        monkeypatch.delenv(heap.ENV, raising=False)
    else:
        monkeypatch.setenv(heap.ENV, text)
    assert heap.mmap_threshold_error(text) is None and heap.mmap_threshold() == value


def test_every_command_refuses_a_bad_threshold_before_it_starts():
    """The root command checks the variable (exit 2, one line naming it), for `vrex run` before the
    clip is even looked at; a good value lets a command run."""
    from typer.testing import CliRunner

    from vrex.cli import app

    runner = CliRunner()
    for args in (["run", "no-such-clip.mp4"], ["hw", "systems"]):
        bad = runner.invoke(app, args, env={heap.ENV: "64k"})
        assert bad.exit_code == 2 and "VREX_MMAP_THRESHOLD='64k'" in bad.output and "no-such-clip" not in bad.output, bad.output
    good = runner.invoke(app, ["hw", "systems"], env={heap.ENV: "65536"})
    assert good.exit_code == 0, good.output
