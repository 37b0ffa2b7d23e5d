"""Tiered KV store: device (byte budget, recent tokens) -> host -> disk (memory-mapped files).

One :class:`KVStore` holds every layer of one stream, as a stack of per-layer :class:`LayerKV` objects
(``store.layers[i]``): each owns its layer's state (token -> slot map, eviction flags, tier bounds,
device and host rings, disk files) and every per-layer operation (``append``, ``gather``,
``read_plan``, ``evict``, ``regroup``, ``keys`` / ``set_keys`` / ``rotate_keys``). The store keeps what
its layers share: shapes and type, the budgets' per-layer capacities, the link counters, the disk
session directory. Tokens of a layer get stable logical ids ``0, 1, ...`` in arrival order
(``append`` returns the first id of the block).

Layout and movement
-------------------
* A **block** is what one ``append`` call stored (a frame, a text chunk, a decoded token). Tiers
  hold whole blocks; oldest blocks move first (device -> host when the device budget would be
  exceeded, host -> disk when the host budget would be), so each tier holds a contiguous range of
  logical ids (disk: oldest, then host, then device: the most recent).
* Each tier is a buffer of **physical slots** per KV head (device/host: ring buffers,
  ``[H, capacity, D]``; disk: two ``numpy.memmap`` files per layer, ``[capacity, H, D]`` raw
  bytes, in a fresh session directory ``disk_dir/vrex-kv-*`` that ``close()``, garbage
  collection or interpreter exit removes). Disk space is reserved with ``posix_fallocate``
  before any state changes, so a full disk raises :class:`KVStoreDiskError` (naming the
  directory) from ``append`` and leaves the store as it was before that call. A block occupies consecutive slots. ``set_block_order`` permutes the
  block's slots per head (cluster-contiguous layout, e.g. ReSV's ``block_order``), and the
  permutation travels with the block to host and disk, so a cluster moves in one transfer.
* **Budgets.** ``device_budget_bytes`` and ``host_budget_bytes`` are split evenly across layers
  (every layer stores the same tokens). ``None`` = unbounded. A block larger than the device
  budget goes straight to host (counted as a device->host offload, as the accelerator produced it).
  ``host_budget_bytes`` requires ``disk_dir``. With no accelerator the device tier is a budgeted
  region of host memory with identical accounting.
* **Eviction** (``evict``) is permanent: evicted tokens are never returned, leave the resident
  byte counts at once, and their slots are reclaimed when their block moves tier or when a tier
  is compacted (once more than half of its slots are evicted).

Accounting (``counters()``; one token of one KV head = ``2 * D * element_size`` bytes, K and V)
------------------------------------------------------------------------------------------------
* ``fetch_host_{bytes,transfers}``: device <- host, by ``gather`` (tokens not on the device).
* ``fetch_disk_{bytes,transfers}``: device <- disk, by ``gather``.
* ``offload_device_host_{bytes,transfers}``, ``offload_host_disk_{bytes,transfers}``: offloads.
* ``device_read_bytes``: device-resident bytes read by ``gather`` (no link crossed).
* ``gathers``; plus ``resident_{device,host,disk}_bytes`` (live tokens per tier).
A **transfer** is one maximal run of consecutive physical slots of one KV head within one tier
(K and V of the run count as one transfer; ring wrap-around is ignored). Fetched tokens are not
promoted: a later step that needs them again fetches them again. ``keys``/``set_keys`` (position
re-indexing) are maintenance and not counted.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import tempfile
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from vrex.kv.index import PagedIndex
from vrex.kv.layers import HALF, LayerSpec, rerotate, rotation

DEVICE, HOST, DISK = "device", "host", "disk"


class KVStoreDiskError(OSError):
    """The disk tier cannot be used (directory not writable, disk full); the message names the directory."""


def _fallocate(fd: int, length: int) -> None:
    """Reserve file space so that memmap writes cannot hit ENOSPC (SIGBUS) later."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, length)
    else:  # pragma: no cover - non-POSIX
        os.ftruncate(fd, length)


#: Bytes a disk tier file pair may pass through its memory maps before this process's pages are unmapped
#: (per layer): bounds the file-backed part of RSS to about this much per layer.
_RELEASE_BYTES = 1 << 20

#: Linux's ``MADV_POPULATE_READ`` (5.14+; Python's mmap module names only some MADV_ flags): map a range
#: in one call instead of one fault per 4 KB page. Read, not write: a write fault on a shared file mapping
#: marks the page dirty, and the kernel would then write back pages nobody changed.
_MADV_POPULATE_READ = 22


class _TurnTables:
    """The rotations by every integer move a disk key may owe (``_Disk``), one table per RoPE
    (``LayerSpec.rope_key``), shared by the layers of a store: ``(lo, packed)``, ``packed`` ``[rows, R]``
    float32 for moves ``lo .. lo + rows - 1``, each row the R/2 distinct cosines, then the R/2 sines, of
    vrex.kv.layers.rotation's row (a pair's two dims share one angle). The kernels read it as it is (the
    full rows were twice the bytes and missed the caches: a layer's frame-step attention over 3 x 4096
    turned keys took 1.62 ms against 0.99 unturned, script); the reference widens the rows it needs
    (:meth:`trig`). A table grows to cover what it is asked for: what the keys owe, a position now minus
    the position written at, so never more rows than the LM has positions (8K for SmolLM2: 2 MB)."""

    def __init__(self) -> None:
        self._tables: dict[tuple, tuple[int, Tensor]] = {}

    def cover(self, rope: LayerSpec, lo: int, hi: int) -> None:
        have = self._tables.get(rope.rope_key)
        if have is not None and have[0] <= lo and hi < have[0] + have[1].shape[0]:
            return
        if have is not None:
            lo, hi = min(lo, have[0]), max(hi, have[0] + have[1].shape[0] - 1)
        cos, sin = rotation(torch.arange(lo, hi + 1), rope.inv_freq.float().cpu(), rope.rope_layout)
        half = (slice(None), slice(0, cos.shape[1] // 2)) if rope.rope_layout == HALF else (slice(None), slice(0, None, 2))
        self._tables[rope.rope_key] = (lo, torch.cat([cos[half], sin[half]], 1).contiguous())

    def get(self, rope: LayerSpec) -> tuple[int, Tensor]:
        """``(lo, packed)`` (see the class docstring)."""
        return self._tables[rope.rope_key]

    def trig(self, rope: LayerSpec, moves: Tensor) -> tuple[Tensor, Tensor]:
        """vrex.kv.layers.rotation's ``(cos, sin)`` rows of ``moves`` (any shape, covered), widened from the
        packed rows: the very values, so the reference turns as the kernels do."""
        lo, packed = self.get(rope)
        cos, sin = packed[moves - lo].chunk(2, -1)
        if rope.rope_layout == HALF:
            return torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
        return cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)


@dataclass
class _Block:
    start: int  # first logical id
    length: int  # logical ids start .. start+length-1
    p0: int  # first absolute physical slot in its tier
    phys: int  # slots occupied (length minus evicted tokens dropped so far)


class _Ring:
    """Ring buffer of slots for one tier of one layer: K, V ``[H, cap, D]`` and slot -> token ids ``int32 [H, cap]``
    (token ids fit: the layer's token -> slot map refuses more than 2^31 tokens, see ``vrex.kv.index``)."""

    def __init__(self, H: int, D: int, dtype, device, cap: int | None):
        self.H, self.D, self.dtype, self.device = H, D, dtype, device
        self.fixed = cap is not None
        c = cap if cap is not None else 64
        self.k = torch.zeros(H, c, D, dtype=dtype, device=device)
        self.v = torch.zeros(H, c, D, dtype=dtype, device=device)
        self.ids = torch.full((H, c), -1, dtype=torch.int32)
        self.front = 0  # absolute slot of the oldest occupied slot
        self.hi = 0  # absolute slot one past the newest

    @property
    def cap(self) -> int:
        return self.k.shape[1]

    @property
    def used(self) -> int:
        return self.hi - self.front

    def room(self) -> int:
        return self.cap - self.used if self.fixed else 1 << 62

    def _reserve(self, n: int) -> None:
        if self.used + n <= self.cap:
            return
        if self.fixed:
            raise RuntimeError("internal: ring overflow")
        new_cap = max(2 * self.cap, self.used + n)
        k = torch.zeros(self.H, new_cap, self.D, dtype=self.dtype, device=self.device)
        v = torch.zeros_like(k)
        ids = torch.full((self.H, new_cap), -1, dtype=torch.int32)
        # Slot s sits at s % cap now and at s % new_cap after: copy runs that neither wraps as slices (script,
        # one layer's ring at 64K tokens: 75 ms, against 94 copied by index; most of the rest is the page
        # faults of the new buffers). An unbounded device tier doubling at 64K stalls one frame by about
        # 30 x that; a device budget (fixed capacity) never doubles.
        s = self.front
        while s < self.hi:
            a, b = s % self.cap, s % new_cap
            run = min(self.hi - s, self.cap - a, new_cap - b)
            k[:, b:b + run] = self.k[:, a:a + run]
            v[:, b:b + run] = self.v[:, a:a + run]
            ids[:, b:b + run] = self.ids[:, a:a + run]
            s += run
        self.k, self.v, self.ids = k, v, ids

    def _idx(self, abs_slots: Tensor) -> Tensor:
        return abs_slots % max(self.cap, 1)

    def push(self, k: Tensor, v: Tensor, ids: Tensor) -> int:
        """Append ``[H, n, D]`` at the back; returns the first absolute slot."""
        n = k.shape[1]
        self._reserve(n)
        p0 = self.hi
        idx = self._idx(torch.arange(p0, p0 + n))
        if n:
            dev_idx = idx.to(self.device)
            self.k[:, dev_idx] = k.to(self.device, self.dtype)
            self.v[:, dev_idx] = v.to(self.device, self.dtype)
            self.ids[:, idx] = ids.to(self.ids.dtype)
        self.hi += n
        return p0

    def read(self, abs_slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``abs_slots`` ``[H, n]`` -> K, V ``[H, n, D]`` and ids ``int64 [H, n]``."""
        idx = self._idx(abs_slots)
        di = idx.to(self.device).unsqueeze(-1).expand(-1, -1, self.D)
        return self.k.gather(1, di), self.v.gather(1, di), self.ids.gather(1, idx).long()

    def read_one(self, abs_slots: Tensor, values: bool) -> Tensor:
        """K (or V) alone at ``abs_slots`` ``[H, n]``: ``[H, n, D]``."""
        di = self._idx(abs_slots).to(self.device).unsqueeze(-1).expand(-1, -1, self.D)
        return (self.v if values else self.k).gather(1, di)

    def read_head_into(self, h: int, abs_slots: Tensor, k_out: Tensor, v_out: Tensor) -> None:
        """Copy one head's slots straight into contiguous ``k_out`` / ``v_out`` rows (one copy, no temporary)."""
        idx = self._idx(abs_slots).to(self.device)
        if k_out.device == self.device and k_out.dtype == self.dtype:
            torch.index_select(self.k[h], 0, idx, out=k_out)
            torch.index_select(self.v[h], 0, idx, out=v_out)
        else:
            k_out.copy_(self.k[h].index_select(0, idx))
            v_out.copy_(self.v[h].index_select(0, idx))

    def write(self, abs_slots: Tensor, k: Tensor | None, v: Tensor | None, ids: Tensor | None) -> None:
        idx = self._idx(abs_slots)
        di = idx.to(self.device)
        # one copy along the slots per head: torch's scatter_ over [H, cap, D] took 13 ms to write 384 tokens
        # into a 64K-slot bf16 ring (a regroup of 30 layers: 1.3 s); index_copy_ per head ~0.1 ms
        for h in range(self.H):
            if k is not None:
                self.k[h].index_copy_(0, di[h], k[h].to(self.device, self.dtype))
            if v is not None:
                self.v[h].index_copy_(0, di[h], v[h].to(self.device, self.dtype))
        if ids is not None:
            self.ids.scatter_(1, idx, ids.to(self.ids.dtype))

    def pop_front(self, n: int) -> None:
        self.front += n


class _Disk:
    """Append-only memory-mapped slot files of one layer: K and V ``[cap, H, D * esize]`` bytes.

    No slot -> token map in memory (the rings keep one for compaction and migration; nothing reads the
    disk tier's back: it was 8 bytes per token and KV head that grew with the stream).

    **Keys stay where they were written.** A position re-index does not rewrite the key file: it adds
    each key's move to ``owed`` (``[rows, H]``, positions the key in slot ``s`` of head ``h`` still has to
    turn; int16, int32 once the moves pass 2^15; its rows cover the slots written before the last move,
    later slots owe nothing), and every read turns the key by what it owes, in float32,
    rounded to the tier's type (``KVStore.rotate_keys``; the fast path's kernels read through the same
    table). Rewriting the tier at each re-index wrote 2.2 GB at 97K tokens, and the kernel's writeback of
    it, 30 s later on the same two cores, made frames 200-250 ms slower (README, the hour runs)."""

    def __init__(self, directory: Path, layer: int, H: int, D: int, dtype, tables: _TurnTables):
        self.dir, self.H, self.D, self.dtype = directory, H, D, dtype
        self.tables = tables
        self.owed: Tensor | None = None
        self.rope: LayerSpec | None = None  # the layer whose RoPE the moves recorded in owed turn by
        self.es = torch.empty(0, dtype=dtype).element_size()
        self.row = H * D * self.es
        self.paths = [directory / f"layer{layer:03d}.k.bin", directory / f"layer{layer:03d}.v.bin"]
        self.cap = 0
        self.hi = 0
        self.mm: list[np.memmap] = []
        self._views: tuple[Tensor, Tensor] | None = None
        self._touched = 0  # bytes written or read since the pages were last unmapped (see touch)

    def reserve(self, n_slots: int) -> None:
        """Make room for ``n_slots`` slots in total; raises KVStoreDiskError and changes nothing on failure."""
        if n_slots <= self.cap:
            return
        new_cap = max(n_slots, 2 * self.cap, 256)
        try:
            for p in self.paths:
                fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    _fallocate(fd, new_cap * self.row)
                finally:
                    os.close(fd)
        except OSError as e:
            why = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
            raise KVStoreDiskError(
                e.errno, f"KV disk tier: cannot grow files in directory '{self.dir}' to {new_cap * self.row} bytes ({why})"
            ) from e
        self.mm = [np.memmap(p, dtype=np.uint8, mode="r+", shape=(new_cap, self.H, self.D * self.es)) for p in self.paths]
        self.cap = new_cap
        self._views = None

    # -- keys that owe a move (see the class docstring) -------------------------------------------
    def record_moves(self, abs_slots: Tensor, moves: Tensor, rope: LayerSpec) -> None:
        """A re-index of the tier's live keys, in slots ``abs_slots`` [H, n], token ``j`` moved by ``moves[j]``
        positions: each move is added to what the key owes, and the shared table of turns covers what the
        keys owe now. The file is not written. (The fast path and the reference both record here; the
        kernels only read ``owed``.)"""
        if self.rope is not None and self.rope.rope_key != rope.rope_key:
            raise ValueError("the disk tier's keys already owe moves of another RoPE; a layer has one RoPE")
        self.rope = rope
        s, rows = abs_slots.long(), 0 if self.owed is None else self.owed.shape[0]
        now = moves.long().cpu()[None].repeat(self.H, 1)  # [H, n]: what each key owes after this move
        if self.owed is not None:
            for h in range(self.H):
                known = s[h] < rows  # slots written since the last move owed nothing
                now[h, known] += self.owed[s[h, known], h].long()
        # every live key takes part in a move, and later slots owe 0: the keys read from now on owe lo .. hi
        lo, hi = (min(0, int(now.min())), max(0, int(now.max()))) if now.numel() else (0, 0)
        if lo < -(2 ** 31) or hi >= 2 ** 31:
            raise OverflowError(f"disk keys would owe moves of {lo}..{hi} positions (past int32)")
        # int16 while the moves fit (an LM of up to 32K positions never owes more): 6 bytes per token and layer
        # at 3 KV heads. Slots of evicted tokens may keep stale values: nothing reads them.
        dtype = torch.int16 if -(2 ** 15) <= lo and hi < 2 ** 15 else torch.int32
        if self.owed is None or rows < self.hi or self.owed.dtype != dtype:
            owed = torch.zeros(max(self.hi, rows), self.H, dtype=dtype)
            if self.owed is not None:
                owed[:rows] = self.owed.to(dtype)
            self.owed = owed
        for h in range(self.H):
            self.owed[s[h], h] = now[h].to(dtype)
        self.tables.cover(rope, lo, hi)

    def turn_args(self) -> dict:
        """The fast path's kernel arguments for reading this tier as tier 0 (empty: no key owes a move)."""
        if self.owed is None:
            return {}
        lo, packed = self.tables.get(self.rope)
        return {"turn": [self.owed, packed], "turn_lo": lo, "turn_half": self.rope.rope_layout == HALF, "turn_tier": 0}

    def _turned(self, k: Tensor, abs_slots: Tensor, h: int | None) -> Tensor:
        """Keys ``k`` [..., n, D] read from ``abs_slots`` (of head ``h``; None: ``k`` is [n, H, D]) turned
        by what they owe, as the kernels turn them (the reference path)."""
        if self.owed is None:
            return k
        s = abs_slots.long()
        known = s < self.owed.shape[0]  # later slots were written after the last move: they owe nothing
        if h is None:
            moves = torch.zeros(s.numel(), self.H, dtype=torch.int64)
            moves[known] = self.owed[s[known]].long()
        else:
            moves = torch.zeros(s.shape, dtype=torch.int64)
            moves[known] = self.owed[s[known], h].long()
        if not moves.any():
            return k
        cos, sin = self.tables.trig(self.rope, moves)
        inv_freq, layout = self.rope.inv_freq, self.rope.rope_layout
        if h is None:  # [n, H, D]: rotate each head's rows by its own moves
            k = k.transpose(0, 1)
            out = torch.stack([rerotate(k[i], moves[:, i], inv_freq, layout, trig=(cos[:, i], sin[:, i]))
                               for i in range(self.H)])
            return out.transpose(0, 1)
        return rerotate(k, moves, inv_freq, layout, trig=(cos, sin))

    def views(self) -> tuple[Tensor, Tensor]:
        """K and V as ``[H, cap, D]`` tensors over the maps themselves (transposed views, no copy): what
        the fast path's kernels read in place, through the page cache."""
        if self._views is None:
            self._views = tuple(torch.from_numpy(m).view(self.dtype).transpose(0, 1) for m in self.mm)
        return self._views

    def _to_np(self, x: Tensor) -> np.ndarray:  # [H, n, D] in any float type -> [n, H, D*es] uint8 of the tier's type
        return x.detach().to("cpu", self.dtype).contiguous().view(torch.uint8).transpose(0, 1).numpy()

    def _from_np(self, a: np.ndarray) -> Tensor:  # [..., D*es] uint8 -> [..., D] dtype
        return torch.from_numpy(np.ascontiguousarray(a)).view(self.dtype)

    def push(self, k: Tensor, v: Tensor, ids: Tensor) -> int:
        n = k.shape[1]
        self.reserve(self.hi + n)
        p0 = self.hi
        if n:
            self.mm[0][p0 : p0 + n] = self._to_np(k)
            self.mm[1][p0 : p0 + n] = self._to_np(v)
            self.touch(2 * n * self.row)
        self.hi += n
        return p0

    def touch(self, nbytes: int) -> None:
        """Count bytes written through the maps; past ``_RELEASE_BYTES`` unmap this process's pages
        (``MADV_DONTNEED``: the data stays in the files and the page cache). Without it every slot ever
        written or read stays resident and RSS grows with the disk tier (``vrex bench soak``). Reads
        release at once: a scattered read maps far more than it copies (the kernel maps 64 KB around a fault)."""
        self._touched += nbytes
        if self._touched >= _RELEASE_BYTES:
            self.release()

    def release(self) -> None:
        self._touched = 0
        for m in self.mm:
            mm = getattr(m, "_mmap", None)
            if mm is not None and hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_DONTNEED)

    def prefault_keys(self) -> None:
        """Map the key file's used slots in one call, before a pass that reads them all
        (``KVStore.rotate_keys``). After ``release`` every page is unmapped, and faulting a page at a
        time cost more than the rotation itself (script, 90K tokens: 24 of 38 ms per layer; populated
        first, 10 + 15 ms). A kernel without the flag refuses it: the pages then fault one by one."""
        mm = getattr(self.mm[0], "_mmap", None) if self.mm else None
        length = self.hi * self.row // mmap.PAGESIZE * mmap.PAGESIZE
        if mm is None or not length or not hasattr(mm, "madvise"):
            return
        try:
            mm.madvise(_MADV_POPULATE_READ, 0, length)
        except OSError:  # older kernel (EINVAL): correct either way, only slower
            pass

    def read_head(self, h: int, abs_slots: Tensor) -> tuple[Tensor, Tensor]:
        s = abs_slots.numpy()
        k, v = self._from_np(self.mm[0][s, h]), self._from_np(self.mm[1][s, h])  # copies
        self.release()
        return self._turned(k, abs_slots, h), v

    def read_head_into(self, h: int, abs_slots: Tensor, k_out: Tensor, v_out: Tensor) -> None:
        k, v = self.read_head(h, abs_slots)
        k_out.copy_(k)
        v_out.copy_(v)

    def read_one(self, abs_slots: Tensor, values: bool) -> Tensor:
        """K (or V) alone at ``abs_slots`` ``[H, n]``: ``[H, n, D]``; the other file is not read, and
        this process's pages are released once, after every head."""
        m = self.mm[1 if values else 0]
        out = torch.stack([self._from_np(m[abs_slots[h].numpy(), h]) if values else
                           self._turned(self._from_np(m[abs_slots[h].numpy(), h]), abs_slots[h], h) for h in range(self.H)])
        self.release()
        return out

    def read(self, abs_slots: Tensor) -> tuple[Tensor, Tensor, None]:
        """K, V ``[H, n, D]``; no token ids (see the class docstring)."""
        ks, vs = zip(*(self.read_head(h, abs_slots[h]) for h in range(self.H)))
        return torch.stack(ks), torch.stack(vs), None

    def write(self, abs_slots: Tensor, k: Tensor | None, v: Tensor | None, ids: Tensor | None) -> None:
        for h in range(self.H):
            s = abs_slots[h].numpy()
            if k is not None:
                self.mm[0][s, h] = k[h].detach().to("cpu", self.dtype).contiguous().view(torch.uint8).numpy()
                if self.owed is not None:
                    written = abs_slots[h].long()
                    self.owed[written[written < self.owed.shape[0]], h] = 0  # written where it is now: owes nothing
            if v is not None:
                self.mm[1][s, h] = v[h].detach().to("cpu", self.dtype).contiguous().view(torch.uint8).numpy()
        self.release()


class _Shared:
    """What a store's layers share and may change: the tiers' per-layer capacities in tokens (``None``:
    unbounded; ``set_device_budget`` changes the device's) and the link counters (module docstring).
    Its own object, referred to by the store and by each layer, so that a layer does not refer to its
    store: without that reference cycle a dropped store's tensors are freed at once, not at the next
    garbage collection (a benchmark forking 4 GB stores one after another ran out of memory)."""

    def __init__(self, token_bytes: int, dev_cap: int | None, host_cap: int | None):
        self.token_bytes, self.dev_cap, self.host_cap = token_bytes, dev_cap, host_cap
        self.c = {k: 0 for k in (
            "fetch_host_bytes", "fetch_host_transfers", "fetch_disk_bytes", "fetch_disk_transfers",
            "offload_device_host_bytes", "offload_device_host_transfers",
            "offload_host_disk_bytes", "offload_host_disk_transfers", "device_read_bytes", "gathers")}

    def count(self, link: str, head_tokens: int, transfers: int) -> None:
        """Count ``head_tokens`` (tokens x KV heads) moved over ``link`` in ``transfers`` transfers."""
        self.c[f"{link}_bytes"] += head_tokens * self.token_bytes
        self.c[f"{link}_transfers"] += transfers


class LayerKV:
    """One layer's tiered K/V: its token -> slot map, eviction flags, tier bounds, and its buffers on each
    tier (device and host rings, the disk files). It owns that state, as a transformers cache layer owns
    its tensors; the :class:`KVStore` it belongs to holds what the layers share (shapes, the disk
    directory, and through ``_Shared`` the budgets' capacities and the link counters). ``store.layers[i]``
    (or ``store[i]``) is layer ``i``; the attention of that layer (``vrex.kv.cache.VrexCacheLayer``) holds
    it directly."""

    def __init__(self, store: "KVStore", index: int):
        s = store
        self._shared = store._shared  # not the store itself: see _Shared
        self.index = index
        # fixed for the store's life; the capacities (set_device_budget) and the counters are in _shared
        self.num_kv_heads, self.head_dim, self.dtype, self.device = s.num_kv_heads, s.head_dim, s.dtype, s.device
        self.token_bytes = s.token_bytes
        self.n = 0
        self.pos = PagedIndex(s.num_kv_heads, f"layer {index}'s token -> slot map")  # absolute slot in its tier
        self.evicted = torch.zeros(64, dtype=torch.bool)
        self.n_evicted = 0
        self.d_end = 0  # tokens < d_end are on disk
        self.h_end = 0  # tokens in [d_end, h_end) are on host; [h_end, n) on device
        self.live = {DEVICE: 0, HOST: 0, DISK: 0}  # live tokens per tier
        self.dev = _Ring(s.num_kv_heads, s.head_dim, s.dtype, s.device, s._shared.dev_cap)
        self.host = _Ring(s.num_kv_heads, s.head_dim, s.dtype, "cpu", s._shared.host_cap)
        self.disk = _Disk(s.disk_dir, index, s.num_kv_heads, s.head_dim, s.dtype, s._turn_tables) if s.disk_dir is not None else None
        self.blocks = {DEVICE: deque(), HOST: deque()}
        self.permuted = False

    def _grow(self, n: int) -> None:
        self.pos.ensure(n)  # raises IndexOverflow past 2^31 tokens, before anything changes
        cap = self.evicted.shape[0]
        if n <= cap:
            return
        ev = torch.zeros(max(n, 2 * cap), dtype=torch.bool)  # 1 byte per token: doubling costs little here
        ev[:cap] = self.evicted
        self.evicted = ev

    # ------------------------------------------------------------------ basics
    @property
    def length(self) -> int:
        """Tokens ever appended to this layer (evicted ones included)."""
        return self.n

    def tier_bounds(self) -> tuple[int, int, int]:
        """``(d_end, h_end, n)``: ids ``< d_end`` on disk, ``< h_end`` on host, the rest on device."""
        return self.d_end, self.h_end, self.n

    def is_evicted(self) -> Tensor:
        """``bool [n]``: which tokens were evicted."""
        return self.evicted[: self.n].clone()

    def _tier_of(self, name: str):
        return {DEVICE: self.dev, HOST: self.host, DISK: self.disk}[name]

    # ------------------------------------------------------------------ append / offload
    def append(self, keys: Tensor, values: Tensor, order: Tensor | None = None) -> int:
        """Store a block ``[H_kv, T, D]``; returns its first logical id.

        ``order`` ``[H_kv, T]`` (optional): the block's physical order, written once: slot ``p`` of
        head ``h`` gets the block's token ``order[h, p]`` (a cluster-contiguous layout, e.g. ReSV's
        ``block_order``); the permutation travels with the block to host and disk."""
        H, T, D = keys.shape
        if (H, D) != (self.num_kv_heads, self.head_dim) or values.shape != keys.shape:
            raise ValueError(f"append expects keys/values [{self.num_kv_heads}, T, {self.head_dim}], got "
                             f"{tuple(keys.shape)} / {tuple(values.shape)}")
        start = self.n
        rel = None
        if order is not None:
            rel = order.to(torch.int64).cpu()
            if tuple(rel.shape) != (H, T) or not torch.equal(rel.sort(1).values, torch.arange(T).expand(H, T)):
                raise ValueError(f"order must be a permutation of 0..{T - 1} for each of the {H} heads, got shape {tuple(rel.shape)}")
            idx = rel.to(keys.device).unsqueeze(-1).expand(H, T, D)
            keys, values = keys.gather(1, idx), values.gather(1, idx)
        # Plan first, so that a disk failure (raised by reserve) leaves the store unchanged.
        tier = DEVICE
        if self.dev.fixed and T > self.dev.cap:
            tier = HOST
        if tier == HOST and self.host.fixed and T > self.host.cap:
            tier = DISK
        if self.disk is not None and self.host.fixed and self.host.used + self.dev.used + T > self.host.cap:
            self.disk.reserve(self.disk.hi + self.host.used + self.dev.used + T)
        self._grow(start + T)
        ids = (start + torch.arange(T)).expand(H, T) if rel is None else start + rel
        if tier == DEVICE:
            self._make_room(DEVICE, T)
            p0 = self.dev.push(keys, values, ids)
            self.blocks[DEVICE].append(_Block(start, T, p0, T))
        else:
            # too big for the device tier: older device blocks go first (tiers hold id ranges in order)
            while self.blocks[DEVICE]:
                self._migrate_oldest(DEVICE)
            self._shared.count("offload_device_host", T * H, H)
            p0, tier = self._push_below_device(start, T, keys, values, ids)
        self.live[tier] += T
        if rel is None:
            self.pos.write(start, torch.arange(p0, p0 + T))
        else:
            self.pos.write(start, torch.empty(H, T, dtype=torch.int64).scatter_(1, rel, torch.arange(p0, p0 + T).expand(H, T)))
            self.permuted = self.permuted or T > 1
        self.n = start + T
        self.pos.compact(self.d_end)  # slots on the disk tier never change: 16-bit offsets (vrex.kv.index)
        return start

    def _push_below_device(self, start: int, length: int, k, v, ids) -> tuple[int, str]:
        """Put a block leaving the device into host (or straight to disk if it exceeds the host budget).

        Returns ``(first slot, tier)`` and moves the tier bounds past the block."""
        n = ids.shape[1]
        if self.host.fixed and n > self.host.cap:
            while self.blocks[HOST]:
                self._migrate_oldest(HOST)
            if n:
                self._shared.count("offload_host_disk", n * self.num_kv_heads, self.num_kv_heads)
            p0 = self.disk.push(k, v, ids) if n else self.disk.hi
            self.d_end = self.h_end = start + length
            return p0, DISK
        self._make_room(HOST, n)
        p0 = self.host.push(k, v, ids) if n else self.host.hi
        self.blocks[HOST].append(_Block(start, length, p0, n))
        self.h_end = start + length
        return p0, HOST

    def _make_room(self, tier: str, n: int) -> None:
        ring = self.dev if tier == DEVICE else self.host
        if not ring.fixed:
            return
        while ring.room() < n and self.blocks[tier]:
            self._migrate_oldest(tier)

    def _migrate_oldest(self, tier: str) -> None:
        """Move the oldest block of ``tier`` (device or host) one tier down, dropping evicted tokens."""
        src = self.dev if tier == DEVICE else self.host
        dst_name = HOST if tier == DEVICE else DISK
        b: _Block = self.blocks[tier].popleft()
        H = self.num_kv_heads
        if b.phys:
            slots = torch.arange(b.p0, b.p0 + b.phys).expand(H, b.phys)
            k, v, ids = src.read(slots)
            live = ~self.evicted[ids[0]]
            if not bool(live.all()):
                keep = ~self.evicted[ids]  # same count per head: a block holds the same tokens on every head
                n_live = int(keep[0].sum())
                k = k[keep].view(H, n_live, self.head_dim)
                v = v[keep].view(H, n_live, self.head_dim)
                ids = ids[keep].view(H, n_live)
            n = ids.shape[1]
        else:
            n = 0
        src.pop_front(b.phys)
        self.live[tier] -= n
        if n == 0:
            k = v = None
            ids = torch.zeros(H, 0, dtype=torch.int64)
        if dst_name == HOST:
            self._shared.count("offload_device_host", n * H, H if n else 0)
            p0, dst_name = self._push_below_device(b.start, b.length, k, v, ids)
        else:
            p0 = self.disk.push(k, v, ids) if n else self.disk.hi
            self.d_end = b.start + b.length
            self._shared.count("offload_host_disk", n * H, H if n else 0)
        self.live[dst_name] += n
        if n:
            self.pos.scatter(ids, torch.arange(p0, p0 + n).expand(H, n))

    # ------------------------------------------------------------------ layout
    def set_block_order(self, start: int, order: Tensor) -> None:
        """Physically permute the block starting at ``start``: slot ``p`` gets token ``start + order[h, p]``."""
        H, T = order.shape
        order = order.to(torch.int64).cpu()
        if H != self.num_kv_heads:
            raise ValueError(f"order must be [{self.num_kv_heads}, T], got {tuple(order.shape)}")
        if not torch.equal(order.sort(1).values, torch.arange(T).expand(H, T)):
            raise ValueError("order must be a permutation of 0..T-1 for every head")
        if start < 0 or start + T > self.n:
            raise ValueError(f"block {start}..{start + T - 1} is outside the {self.n} stored tokens")
        if bool(self.evicted[start : start + T].any()):
            raise ValueError(f"block at {start} has evicted tokens; it cannot be reordered")
        tier = DISK if start + T <= self.d_end else HOST if start >= self.d_end and start + T <= self.h_end else DEVICE
        if tier == DEVICE and start < self.h_end:
            raise ValueError(f"tokens {start}..{start + T - 1} span two tiers")
        if tier == DISK:
            cur = self.pos.read(start, start + T)
            p0 = int(cur.min())
            if not bool((cur.min(1).values == p0).all() and (cur.max(1).values == p0 + T - 1).all()):
                raise ValueError(f"tokens {start}..{start + T - 1} are not one stored block")
            block = _Block(start, T, p0, T)
        else:
            block = next((b for b in reversed(self.blocks[tier]) if b.start == start), None)
            if block is None:
                raise ValueError(f"no block starts at token {start} in layer {self.index}")
        if block.length != T or block.phys != T:
            raise ValueError(f"block at {start} has {block.length} tokens ({block.phys} live slots); order has {T}")
        self._write_order(self._tier_of(tier), start, block.p0, order)

    def _write_order(self, ring, start: int, p0: int, order: Tensor) -> None:
        """Rewrite the slots ``p0 ..`` of a block (every token live) so slot ``p0 + p`` of head ``h`` holds
        token ``start + order[h, p]``."""
        H, T = order.shape
        tok = start + order  # [H, T]: token for slot p
        k, v, _ = ring.read(self.pos.gather(tok))
        slots = torch.arange(p0, p0 + T).expand(H, T).contiguous()
        ring.write(slots, k, v, tok)
        self.pos.scatter(tok, slots)
        self.permuted = True

    def regroup(self, start: int, end: int, order_of: Callable[[int, int], Tensor]) -> int:
        """Merge the blocks of tokens ``start .. end-1`` into one block per ring tier (device, host), written
        in ``order_of(a, b)``'s physical order (``[H, b - a]``, block-relative, e.g. ReSV's cluster order).

        Why: a block is written in its cluster order when it arrives, but a cluster collects tokens over
        many frames, so reading it took one run per frame (about 3 tokens). Regrouping a span of frames
        by cluster, as the paper's KV memory unit lays out what it offloads, makes each cluster one run
        per span: fewer transfers from the host and disk tiers, and rows the CPU reads in sequence.
        ``start`` and ``end`` must fall on block boundaries. Tokens already on the disk tier (its files
        are written once), a tier's part with evicted tokens, and a part that is a single block stay as
        they are. Returns the number of tokens regrouped."""
        if not 0 <= start <= end <= self.n:
            raise ValueError(f"regroup: tokens {start}..{end - 1} are outside the {self.n} stored tokens of layer {self.index}")
        done = 0
        for tier, ring in ((HOST, self.host), (DEVICE, self.dev)):
            blocks = self.blocks[tier]
            inside = []  # indices of the blocks that overlap the span: the newest ones, so scan from the back
            for i in range(len(blocks) - 1, -1, -1):
                if blocks[i].start + blocks[i].length <= start:
                    break
                if blocks[i].start < end:
                    inside.append(i)
            if not inside:
                continue
            inside.reverse()
            first, last = blocks[inside[0]], blocks[inside[-1]]
            if (first.start < start and first.start + first.length > start) or last.start + last.length > end:
                raise ValueError(f"regroup: tokens {start}..{end - 1} of layer {self.index} cut a block")
            a, b = first.start, last.start + last.length
            if len(inside) < 2 or self.n_evicted and bool(self.evicted[a:b].any()):
                continue
            merged = _Block(a, b - a, first.p0, b - a)
            if any(blocks[i].phys != blocks[i].length for i in inside) or last.p0 + last.phys != first.p0 + merged.phys:
                raise RuntimeError(f"internal: layer {self.index}'s blocks {a}..{b - 1} do not fill consecutive slots")
            order = order_of(a, b).to(torch.int64).cpu()
            if tuple(order.shape) != (self.num_kv_heads, b - a):
                raise ValueError(f"regroup: order_of({a}, {b}) gave shape {tuple(order.shape)}, "
                                 f"expected ({self.num_kv_heads}, {b - a})")
            self._write_order(ring, a, first.p0, order)
            tail = [blocks.pop() for _ in range(len(blocks) - inside[0])][::-1]  # the span's blocks and any after
            blocks.append(merged)
            blocks.extend(tail[len(inside):])
            done += b - a
        return done

    # ------------------------------------------------------------------ eviction
    def evict(self, indices: Tensor) -> None:
        """Drop tokens for good (same ids on every KV head). Already-evicted ids are ignored."""
        idx = torch.as_tensor(indices, dtype=torch.int64).flatten().cpu()
        if idx.numel() == 0:
            return
        if int(idx.min()) < 0 or int(idx.max()) >= self.n:
            raise IndexError(f"evict: ids must be in [0, {self.n})")
        idx = torch.unique(idx)
        idx = idx[~self.evicted[idx]]
        if idx.numel() == 0:
            return
        self.evicted[idx] = True
        self.n_evicted += int(idx.numel())
        self.live[DISK] -= int((idx < self.d_end).sum())
        self.live[HOST] -= int(((idx >= self.d_end) & (idx < self.h_end)).sum())
        self.live[DEVICE] -= int((idx >= self.h_end).sum())
        for tier, ring in ((DEVICE, self.dev), (HOST, self.host)):
            if ring.used >= 64 and 2 * self.live[tier] < ring.used:
                self._compact(tier)

    def _compact(self, tier: str) -> None:
        """Rewrite a ring without its evicted slots (amortised: runs once half the slots are dead), at the
        tier's capacity now (``set_device_budget`` changes the device's)."""
        ring = self.dev if tier == DEVICE else self.host
        H = self.num_kv_heads
        fresh = _Ring(H, self.head_dim, self.dtype, ring.device, self._shared.dev_cap if tier == DEVICE else self._shared.host_cap)
        new_blocks: deque[_Block] = deque()
        for b in self.blocks[tier]:
            if b.phys:
                k, v, ids = ring.read(torch.arange(b.p0, b.p0 + b.phys).expand(H, b.phys))
                keep = ~self.evicted[ids]
                n = int(keep[0].sum())
                k, v, ids = k[keep].view(H, n, self.head_dim), v[keep].view(H, n, self.head_dim), ids[keep].view(H, n)
            else:
                n = 0
            p0 = fresh.hi
            if n:
                fresh.push(k, v, ids)
                self.pos.scatter(ids, torch.arange(p0, p0 + n).expand(H, n))
            if n == 0 and new_blocks:  # merge empty blocks into their predecessor
                prev = new_blocks[-1]
                prev.length = b.start + b.length - prev.start
                continue
            new_blocks.append(_Block(b.start, b.length, p0, n))
        if tier == DEVICE:
            self.dev = fresh
        else:
            self.host = fresh
        self.blocks[tier] = new_blocks

    # ------------------------------------------------------------------ reading
    def _live_all(self) -> Tensor:
        ids = torch.arange(self.n)
        return ids[~self.evicted[: self.n]] if self.n_evicted else ids

    def gather(self, indices: list[Tensor] | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """K, V of the selected tokens per KV head (see the module docstring for accounting).

        ``indices=None``: every live token, ``[H, N_live, D]``, mask ``None`` (may be a view of
        the device buffer: treat as read-only). Else one sorted id tensor per head: K, V padded to
        ``[H, L_max, D]`` plus a bool ``valid`` mask ``[H, L_max]`` (``None`` when all heads have
        the same length). Evicted ids in ``indices`` are skipped.
        """
        H, D = self.num_kv_heads, self.head_dim
        self._shared.c["gathers"] += 1
        if indices is None:
            if self.n_evicted == 0 and self.h_end == 0 and not self.permuted and self.dev.cap > 0:
                # fast path (full policy): everything on device, arrival order, contiguous slots
                a = self.dev.front % self.dev.cap
                if a + self.n <= self.dev.cap:
                    self._shared.c["device_read_bytes"] += self.n * H * self.token_bytes
                    return self.dev.k[:, a : a + self.n], self.dev.v[:, a : a + self.n], None
            if self.n_evicted == 0 and not self.permuted:
                return self._gather_all_contiguous()
            ids = self._live_all()
            indices = [ids] * H
        if len(indices) != H:
            raise ValueError(f"gather expects {H} index tensors (one per KV head), got {len(indices)}")
        parts = []
        for h in range(H):
            idx = torch.as_tensor(indices[h], dtype=torch.int64).cpu()
            if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= self.n):
                raise IndexError(f"gather: ids must be sorted and in [0, {self.n}) (layer {self.index}, head {h})")
            if self.n_evicted and idx.numel():
                idx = idx[~self.evicted[idx]]
            parts.append(idx)
        lens = [int(p.numel()) for p in parts]
        lmax = max(lens) if lens else 0
        k_out = torch.empty(H, lmax, D, dtype=self.dtype, device=self.device)
        v_out = torch.empty_like(k_out)
        bounds = torch.tensor([self.d_end, self.h_end])
        for h, idx in enumerate(parts):
            if lens[h] < lmax:  # padding must be finite (masked attention still multiplies it by 0)
                k_out[h, lens[h]:] = 0
                v_out[h, lens[h]:] = 0
            if not idx.numel():
                continue
            cut = torch.searchsorted(idx, bounds).tolist()
            segs = ((DISK, 0, cut[0]), (HOST, cut[0], cut[1]), (DEVICE, cut[1], idx.numel()))
            for tier, a, b in segs:
                if b <= a:
                    continue
                slots = self.pos.take(idx[a:b], row=h)
                self._tier_of(tier).read_head_into(h, slots, k_out[h, a:b], v_out[h, a:b])
                n = b - a
                if tier == DEVICE:
                    self._shared.c["device_read_bytes"] += n * self.token_bytes
                else:
                    # slots grow with ids unless a block was reordered (set_block_order)
                    srt = torch.sort(slots).values if self.permuted else slots
                    runs = 1 + int((srt[1:] - srt[:-1] != 1).sum())
                    self._shared.count("fetch_host" if tier == HOST else "fetch_disk", n, runs)
        valid = None
        if len(set(lens)) > 1:
            valid = torch.arange(lmax).unsqueeze(0) < torch.tensor(lens).unsqueeze(1)
            valid = valid.to(self.device)
        return k_out, v_out, valid

    def read_plan(self, ids: Tensor, offs: Tensor, everything: bool, n_past: int, sink: int,
                  recent_start: int, n_new: int = 0) -> "ReadPlan":
        """Where the fast path reads (``vrex.kv.fast``): per tier (disk, host, device), the physical slots
        of the selected past tokens of each head, plus ``[0, sink)`` and ``[recent_start, n_past)``;
        evicted tokens skipped. Counted exactly as :meth:`gather` counts the same selection
        (``everything``: the step's ``n_new`` tokens too, which the reference stores first and reads
        back). The disk tier is read in place through its memory maps; call :meth:`ReadPlan.done`
        after the kernel so the pages it faulted in leave this process (see ``_Disk.touch``)."""
        from vrex.kv.fast import load
        H = self.num_kv_heads
        ks, ko, hs, ho, ds, do, disk_runs, host_runs, sel = load().plan_reads(
            ids, offs, everything, n_past, sink, recent_start, self.pos.pages, self.pos.shift, H, self.evicted, self.n_evicted > 0,
            self.d_end, self.h_end)
        self._shared.c["gathers"] += 1
        n_dev, n_host, n_disk = int(ds.numel()), int(hs.numel()), int(ks.numel())
        self._shared.c["device_read_bytes"] += (n_dev + (n_new * H if everything else 0)) * self.token_bytes
        if n_host:
            self._shared.count("fetch_host", n_host, int(host_runs.sum()))
        kbufs, vbufs, slots, offsets, disk = [self.host.k, self.dev.k], [self.host.v, self.dev.v], [hs, ds], [ho, do], None
        if n_disk:
            self._shared.count("fetch_disk", n_disk, int(disk_runs.sum()))
            disk = self.disk
            dk, dv = disk.views()
            kbufs, vbufs, slots, offsets = [dk, *kbufs], [dv, *vbufs], [ks, *slots], [ko, *offsets]
        return ReadPlan(kbufs, vbufs, slots, offsets, sel.tolist(), disk, disk.turn_args() if disk is not None else {})

    def _gather_all_contiguous(self) -> tuple[Tensor, Tensor, None]:
        """Every token, no evictions, arrival-order slots: one slice copy per tier (FlexGen's fetch-all)."""
        H, D = self.num_kv_heads, self.head_dim
        k_out = torch.empty(H, self.n, D, dtype=self.dtype, device=self.device)
        v_out = torch.empty_like(k_out)
        for tier, a, b in ((DISK, 0, self.d_end), (HOST, self.d_end, self.h_end), (DEVICE, self.h_end, self.n)):
            n = b - a
            if n <= 0:
                continue
            p = int(self.pos.read(a, a + 1)[0, 0])
            store = self._tier_of(tier)
            if tier == DISK:
                for out, mm in ((k_out, store.mm[0]), (v_out, store.mm[1])):
                    arr = torch.from_numpy(np.ascontiguousarray(mm[p : p + n])).view(self.dtype)  # [n, H, D]
                    if out is k_out:
                        arr = store._turned(arr, torch.arange(p, p + n), None)
                    out[:, a:b] = arr.transpose(0, 1).to(self.device)
                store.release()
            else:
                i0 = p % store.cap
                first = min(n, store.cap - i0)
                k_out[:, a : a + first] = store.k[:, i0 : i0 + first]
                v_out[:, a : a + first] = store.v[:, i0 : i0 + first]
                if first < n:  # wrapped around the ring
                    k_out[:, a + first : b] = store.k[:, : n - first]
                    v_out[:, a + first : b] = store.v[:, : n - first]
            if tier == DEVICE:
                self._shared.c["device_read_bytes"] += n * H * self.token_bytes
            else:
                self._shared.count("fetch_host" if tier == HOST else "fetch_disk", n * H, H)
        return k_out, v_out, None

    def keys(self) -> Tensor:
        """All keys ``[H, N, D]`` in arrival order (N = ``length``; evicted tokens are zeros)."""
        return self._all(want_values=False)

    def values(self) -> Tensor:
        """All values ``[H, N, D]`` in arrival order (evicted tokens are zeros)."""
        return self._all(want_values=True)

    def _all(self, want_values: bool) -> Tensor:
        H, D = self.num_kv_heads, self.head_dim
        out = torch.zeros(H, self.n, D, dtype=self.dtype, device=self.device)
        for store, sel in self._live_by_tier():
            # only the half asked for: re-indexing reads every key of every tier back, never a value
            out[:, sel.to(self.device)] = store.read_one(self.pos.take(sel), want_values).to(self.device)
        return out

    def set_keys(self, keys: Tensor, *, moves: Tensor | None = None, rope: LayerSpec | None = None) -> None:
        """Overwrite all keys ``[H, N, D]``; evicted rows are ignored. ``moves`` [N] (ints) and ``rope``
        (the layer's spec: its RoPE): ``keys`` are the stored keys moved by that many positions (a re-index,
        the reference of :meth:`rotate_keys`), and the disk tier records the moves instead of being
        rewritten (``_Disk``)."""
        if tuple(keys.shape) != (self.num_kv_heads, self.n, self.head_dim):
            raise ValueError(f"set_keys expects [{self.num_kv_heads}, {self.n}, {self.head_dim}], got {tuple(keys.shape)}")
        if moves is not None:
            moves = moves.long().cpu()
        for store, sel in self._live_by_tier():
            if store is self.disk and moves is not None:
                self.disk.record_moves(self.pos.take(sel), moves[sel], rope)
            else:
                store.write(self.pos.take(sel), keys[:, sel.to(keys.device)], None, None)

    def rotate_keys(self, cos: Tensor, sin: Tensor, half: bool, keys_out: Tensor | None = None, *,
                    moves: Tensor | None = None, rope: LayerSpec | None = None) -> None:
        """Position re-indexing through the fast path (``vrex.kv.fast``): every live key of the device and
        host tiers rotated in its own slot by ``cos``/``sin`` ``[N, R]`` (row = token id, float32 math,
        rounded once to the store's type) by ``rotate_keys``; the disk tier's keys stay where they are and
        record their move (``moves`` [N], ints, with the layer's spec as ``rope``; needed
        when the disk holds tokens; ``_Disk.record_moves``). The same result as ``set_keys(rerotate(keys(),
        ...), moves=..., rope=...)``, without the copies. ``keys_out`` (float32, resized here to ``[H, N, D]``):
        also the keys as ``keys()`` gives them, for a policy's index; the caller may reuse it from layer
        to layer (a fresh 25 MB buffer per layer at 32K tokens cost its page faults: 10 of every 24 ms)."""
        from vrex.kv.fast import load
        bufs, slots, ids, disk_sel = [], [], [], None
        for tier, sel in self._live_by_tier():
            if tier is self.disk:
                disk_sel = sel.long()
                continue
            bufs.append(tier.k)
            slots.append(self.pos.take(sel).long())
            ids.append(sel.long())
        if disk_sel is not None and (moves is None or rope is None):
            raise ValueError(f"layer {self.index}'s disk tier holds keys: rotate_keys needs their moves and the layer's RoPE "
                             "(moves=, rope=)")
        out = torch.empty(0)
        if keys_out is not None:  # every live row is written by the kernel; evicted rows read as zeros, as in keys()
            need = self.num_kv_heads * self.n * self.head_dim
            if keys_out.untyped_storage().nbytes() < 4 * need:
                # fresh storage with room for the tokens of later steps: resize_ would copy the old contents
                # (which the kernel overwrites anyway), 39 ms per step at 90K tokens as the stream grew
                keys_out.set_(torch.empty(need + need // 8, dtype=torch.float32).untyped_storage())
            out = keys_out.resize_(self.num_kv_heads, self.n, self.head_dim)
            if self.n_evicted:
                out[:, self.evicted[:self.n]] = 0
        load().rotate_keys(bufs, slots, ids, cos.float(), sin.float(), half, out)
        if disk_sel is not None:
            disk_slots = self.pos.take(disk_sel).long()
            self.disk.record_moves(disk_slots, moves.long().cpu()[disk_sel], rope)
            if keys_out is not None:
                self.disk.prefault_keys()
                turn = self.disk.turn_args()
                load().turn_disk_keys(self.disk.views()[0], disk_slots, disk_sel, turn["turn"], turn["turn_lo"],
                                      turn["turn_half"], out)
                self.disk.release()  # the pages the turn read leave this process (see _Disk.touch)

    def _live_by_tier(self):
        """(tier buffer, live ids on it) for each tier holding live tokens of the layer."""
        ids = self._live_all()
        for tier, a, b in ((DISK, 0, self.d_end), (HOST, self.d_end, self.h_end), (DEVICE, self.h_end, self.n)):
            sel = ids[(ids >= a) & (ids < b)]
            if sel.numel():
                yield self._tier_of(tier), sel

@dataclass
class ReadPlan:
    """Tier buffers and the slots to read in each, per KV head (see :meth:`LayerKV.read_plan`): the
    arguments of ``vrex.kv.fast`` ``attend_plan`` and ``attend_slots``."""

    kbufs: list[Tensor]
    vbufs: list[Tensor]
    slots: list[Tensor]
    offs: list[Tensor]
    selected: list[int]  # tokens read per KV head
    disk: "_Disk | None" = None  # the disk tier the plan reads in place, if any
    turn_args: dict = field(default_factory=dict)  # the disk keys' owed moves, for the kernels (``_Disk.turn_args``)

    def done(self) -> None:
        """The kernel has read the plan: unmap the disk pages it faulted in (RSS stays bounded)."""
        if self.disk is not None:
            self.disk.release()


class KVStore:
    """Tiered KV storage for one stream (see the module docstring)."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype=torch.float32,
        device="cpu",
        device_budget_bytes: int | None = None,
        host_budget_bytes: int | None = None,
        disk_dir: str | Path | None = None,
    ) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.element_size = torch.empty(0, dtype=dtype).element_size()
        self.token_bytes = 2 * head_dim * self.element_size  # one token of one KV head, K + V
        self.token_bytes_all_heads = self.token_bytes * num_kv_heads
        self.device_budget_bytes, self.host_budget_bytes = device_budget_bytes, host_budget_bytes
        if host_budget_bytes is not None and disk_dir is None:
            raise ValueError("host_budget_bytes needs disk_dir: tokens beyond the host budget go to disk")
        self._shared = _Shared(self.token_bytes, None if device_budget_bytes is None else self._cap(device_budget_bytes),
                               None if host_budget_bytes is None else self._cap(host_budget_bytes))
        self.disk_dir: Path | None = None  # this store's own session directory inside ``disk_dir``
        if disk_dir is not None:
            self.disk_dir = _session_dir(Path(disk_dir))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.disk_dir), True)
        self._turn_tables = _TurnTables()
        #: the per-layer stores, in layer order (each owns its state; see LayerKV)
        self.layers: list[LayerKV] = [LayerKV(self, i) for i in range(num_layers)]

    def __getitem__(self, layer: int) -> LayerKV:
        return self.layers[layer]

    def __len__(self) -> int:
        return self.num_layers

    def _cap(self, budget: int) -> int:
        return max(0, int(budget) // self.num_layers // self.token_bytes_all_heads)

    def set_device_budget(self, budget_bytes: int | None) -> None:
        """Give the device tier a new budget (``None``: unbounded); e.g. a batched engine splits one budget
        again when a stream joins or leaves. Below a smaller budget the oldest blocks move to the host
        now, counted as offloads, exactly as later appends would have moved them; a larger one keeps
        the blocks where they are and lets later blocks stay longer. Each layer's device ring is
        compacted into one of the new capacity (its live slots copied once, in order)."""
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"device budget must be >= 0 bytes or None, got {budget_bytes}")
        self.device_budget_bytes = budget_bytes
        cap = self._shared.dev_cap = None if budget_bytes is None else self._cap(budget_bytes)
        for L in self.layers:
            if cap is not None:
                while L.blocks[DEVICE] and L.dev.used > cap:
                    L._migrate_oldest(DEVICE)
            L._compact(DEVICE)

    # ------------------------------------------------------------------ accounting
    def resident_bytes(self) -> dict[str, int]:
        """Live bytes per tier (all layers, K + V)."""
        out = {DEVICE: 0, HOST: 0, DISK: 0}
        for L in self.layers:
            for t in out:
                out[t] += L.live[t] * self.token_bytes_all_heads
        return out

    def mapped_data_ptrs(self) -> set[int]:
        """Data pointers of the tensors that view the disk tier's memory maps (the fast path reads
        through them): file pages, not heap, for whoever counts tensor memory (``vrex bench soak``)."""
        return {t.untyped_storage().data_ptr() for L in self.layers if L.disk is not None and L.disk._views
                for t in L.disk._views}

    def index_nbytes(self) -> int:
        """Bytes of the per-token bookkeeping held in memory, all layers: the token -> slot maps
        (int32 pages, ``vrex.kv.index``), the eviction flags, the rings' slot -> token ids and the moves the
        disk tier's keys owe since a re-index (``_Disk.owed``). The K/V itself is in ``resident_bytes``."""
        total = 0
        for L in self.layers:
            total += L.pos.nbytes() + L.evicted.untyped_storage().nbytes()
            total += L.dev.ids.untyped_storage().nbytes() + L.host.ids.untyped_storage().nbytes()
            if L.disk is not None and L.disk.owed is not None:
                total += L.disk.owed.untyped_storage().nbytes()
        return total

    def counters(self) -> dict:
        """Flat dict of link counters and resident bytes (see the module docstring)."""
        c = dict(self._shared.c)
        for t, b in self.resident_bytes().items():
            c[f"resident_{t}_bytes"] = b
        return c

    def reset_counters(self) -> None:
        for k in self._shared.c:
            self._shared.c[k] = 0

    def close(self, remove_files: bool = True) -> None:
        """Drop memory maps and (by default) delete this store's session directory.

        The session directory is also removed when the store is garbage-collected or at exit."""
        for L in self.layers:
            if L.disk is not None:
                L.disk.mm, L.disk._views = [], None  # the views hold the maps open too
        if remove_files and self.disk_dir is not None:
            self._cleanup()


def _remove_stale(parent: Path) -> None:
    """Remove ``vrex-kv-*`` directories left by killed runs (their owner's pid no longer exists)."""
    for d in parent.glob("vrex-kv-*"):
        try:
            pid = int((d / "owner.pid").read_text())
        except (OSError, ValueError):
            continue  # not ours to judge (no owner file): leave it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def _session_dir(parent: Path) -> Path:
    """A fresh ``vrex-kv-*`` directory inside ``parent`` (created if needed), probed for writing and
    stamped with this process's pid, so a later run removes it if this one is killed."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(parent)
        d = Path(tempfile.mkdtemp(prefix="vrex-kv-", dir=parent))
        (d / "owner.pid").write_text(str(os.getpid()))
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=d)
        os.close(fd)
        os.unlink(probe)
        return d
    except OSError as e:
        raise KVStoreDiskError(e.errno, f"KV disk tier directory '{parent}' is not usable: {e.strerror or e}") from e


__all__ = ["KVStore", "LayerKV", "KVStoreDiskError", "ReadPlan", "DEVICE", "HOST", "DISK"]
