"""KVMU: the DRE's KV memory management unit (V-Rex §IV-C, Fig. 13).

Hardware (Table III: 0.01 mm², 15 mW per core). It manages three tiers -- accelerator DRAM, host
DRAM, SSD -- and reorders each new frame's KV so that a cluster's tokens are contiguous, so one
PCIe/NVMe transfer moves a whole cluster segment instead of one token (256 B per head) at a time.

Model, per layer and KV head (all heads share the tier capacities, in tokens):

* **Blocks.** Tokens arrive in blocks (a frame, a question, a decoded token). A block is written to
  the first tier at that tier's next free slot. ``layout="cluster"`` stores the block's tokens
  grouped by cluster id (ascending), arrival order inside a cluster -- exactly
  :meth:`vrex.resv.table.HCTable.block_order`; ``layout="arrival"`` keeps arrival order (what a
  GPU runtime does). One slot holds one token's K and V for one head.
* **Placement.** When a tier holds more tokens than its capacity, its oldest blocks move to the next
  tier's next free slots (FIFO offload of the oldest KV, the paper's "predefined maximum
  capacity"), ``offload_chunk`` blocks at a time (at most the tier's blocks). With the cluster
  layout a chunk of several blocks is **regrouped on the way out**: its tokens are written grouped
  by cluster id across the whole chunk (arrival order inside a cluster), so a cluster that spans the
  chunk's frames becomes one contiguous segment -- per-frame grouping alone leaves a temporal
  cluster in one piece per frame (runs of ~3-5 tokens where clusters span frames). A chunk of one
  block keeps the block's own layout. The last tier is unbounded.
* **Transfer list.** A retrieval (selected token ids per head) is mapped to slots; tokens in the
  first tier are local reads; the others are sorted by (tier, slot) and adjacent slots are merged
  into one transfer. Every selected token is covered exactly once and no two transfers of a tier
  and head touch or overlap. Byte counts are reported at slot granularity and at the tier's access
  granularity (4 KB NVMe pages on an SSD, 64 B on host DRAM), the amount the device actually reads.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Literal

import torch

Layout = Literal["cluster", "arrival"]


@dataclass(frozen=True)
class Tier:
    """One memory tier. ``capacity`` in tokens (``None`` = unbounded); ``access_bytes``: read granularity."""

    name: str
    capacity: int | None
    access_bytes: int = 64


@dataclass(frozen=True)
class KVMUConfig:
    """Tiers in order (first = accelerator DRAM) and the layout policy."""

    tiers: tuple[Tier, ...] = (Tier("device", 8192), Tier("host", 1 << 22), Tier("ssd", None, 4096))
    layout: Layout = "cluster"
    slot_bytes: int = 512  # K + V of one token for one head: 2 x 128 x BF16
    offload_chunk: int = 1  # blocks moved (and, with the cluster layout, regrouped) per offload


@dataclass(frozen=True)
class Transfer:
    """One contiguous read from an offload tier."""

    head: int
    tier: str
    slot: int  # first slot in the tier's address space
    n_slots: int
    nbytes: int  # n_slots * slot_bytes
    read_bytes: int  # at the tier's access granularity (this run alone)


@dataclass
class _Block:
    start: int  # first token id
    order: list[int]  # order[p] = block-relative token stored at physical position p, per head
    tier: int
    base: int  # first slot in the tier
    inv: list[int] = field(default_factory=list)  # inv[token offset] = physical position
    cids: list[int] = field(default_factory=list)  # cluster id per token offset (cluster layout)
    slots: list[int] | None = None  # slot per token offset after a regrouped offload (else base + inv)


class KVMU:
    """Placement, layout and transfer lists for one layer's ``num_heads`` KV heads."""

    def __init__(self, num_heads: int, cfg: KVMUConfig = KVMUConfig()) -> None:
        if cfg.tiers[-1].capacity is not None:
            raise ValueError("the last tier must be unbounded (capacity=None)")
        self.cfg, self.H = cfg, num_heads
        self.blocks: list[list[_Block]] = [[] for _ in range(num_heads)]
        self.starts: list[int] = []  # block start tokens (shared by heads)
        self.n_tokens = 0
        self.next_slot = [[0] * len(cfg.tiers) for _ in range(num_heads)]
        self.used = [[0] * len(cfg.tiers) for _ in range(num_heads)]

    def append(self, length: int, cluster_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Place the next ``length`` tokens; ``cluster_ids int [H, length]`` drive the cluster layout.

        Returns the physical order ``int64 [H, length]`` (``order[h, p]`` = block-relative token at
        position ``p``).
        """
        H = self.H
        cids = cluster_ids.to(torch.int64).tolist() if cluster_ids is not None else [[0] * length] * H
        if self.cfg.layout == "cluster" and cluster_ids is not None:
            key = cluster_ids.to(torch.int64) * length + torch.arange(length)
            order = torch.argsort(key, dim=1, stable=True)
        else:
            order = torch.arange(length).expand(H, length)
        self.starts.append(self.n_tokens)
        for h in range(H):
            o = order[h].tolist()
            inv = [0] * length
            for p, t in enumerate(o):
                inv[t] = p
            blk = _Block(self.n_tokens, o, 0, self.next_slot[h][0], inv, list(cids[h]))
            self.next_slot[h][0] += length
            self.used[h][0] += length
            self.blocks[h].append(blk)
            self._spill(h)
        self.n_tokens += length
        return order.clone()

    def _spill(self, h: int) -> None:
        for ti, tier in enumerate(self.cfg.tiers[:-1]):
            while tier.capacity is not None and self.used[h][ti] > tier.capacity:
                here = [b for b in self.blocks[h] if b.tier == ti]  # oldest first
                chunk = here[: max(1, self.cfg.offload_chunk)]
                n = sum(len(b.order) for b in chunk)
                self.used[h][ti] -= n
                self.used[h][ti + 1] += n
                base = self.next_slot[h][ti + 1]
                self.next_slot[h][ti + 1] += n
                if len(chunk) == 1 or self.cfg.layout != "cluster":
                    for b in chunk:  # whole blocks, with their layout, back to back
                        b.tier, b.base, b.slots = ti + 1, base, None
                        base += len(b.order)
                    continue
                # regroup the chunk by cluster id across its blocks (arrival order inside a cluster)
                toks = sorted(((b.cids[i], b.start + i, b) for b in chunk for i in range(len(b.order))),
                              key=lambda x: (x[0], x[1]))
                for b in chunk:
                    b.tier, b.base, b.slots = ti + 1, base, [0] * len(b.order)
                for k, (_, t, b) in enumerate(toks):
                    b.slots[t - b.start] = base + k  # type: ignore[index]

    def locate(self, head: int, token: int) -> tuple[str, int]:
        """(tier name, slot) of one token."""
        if not 0 <= token < self.n_tokens:
            raise IndexError(f"token {token} not stored (have {self.n_tokens})")
        b = self.blocks[head][bisect.bisect_right(self.starts, token) - 1]
        if b.slots is not None:
            return self.cfg.tiers[b.tier].name, b.slots[token - b.start]
        return self.cfg.tiers[b.tier].name, b.base + b.inv[token - b.start]

    def tier_tokens(self, head: int = 0) -> dict[str, int]:
        """Tokens resident per tier for one head."""
        return {t.name: self.used[head][i] for i, t in enumerate(self.cfg.tiers)}

    def transfer_list(self, selected: list[torch.Tensor]) -> tuple[list[Transfer], dict[str, int]]:
        """Transfers for per-head selections (token ids); returns (transfers, summary counters)."""
        first = self.cfg.tiers[0].name
        gran = {t.name: t.access_bytes for t in self.cfg.tiers}
        sb = self.cfg.slot_bytes
        out: list[Transfer] = []
        local = 0
        for h, toks in enumerate(selected):
            by_tier: dict[str, list[int]] = {}
            for tok in sorted(set(int(t) for t in toks.tolist())):
                tier, slot = self.locate(h, tok)
                if tier == first:
                    local += 1
                else:
                    by_tier.setdefault(tier, []).append(slot)
            for tier, slots in by_tier.items():
                slots.sort()
                run_start = prev = slots[0]
                for s in slots[1:] + [None]:
                    if s is not None and s == prev + 1:
                        prev = s
                        continue
                    n = prev - run_start + 1
                    g = gran[tier]
                    rb = ((run_start * sb + n * sb - 1) // g - (run_start * sb) // g + 1) * g
                    out.append(Transfer(h, tier, run_start, n, n * sb, rb))
                    if s is not None:
                        run_start = prev = s
        summary = {
            "local_tokens": local,
            "transfers": len(out),
            "offloaded_tokens": sum(t.n_slots for t in out),
            "bytes": sum(t.nbytes for t in out),
            "read_bytes": _distinct_read_bytes(out, gran, sb),
        }
        return out, summary


def _distinct_read_bytes(transfers: list[Transfer], gran: dict[str, int], sb: int) -> int:
    """Bytes read at access granularity, counting a unit shared by two runs once."""
    units: set[tuple[int, str, int]] = set()
    for t in transfers:
        g = gran[t.tier]
        lo, hi = t.slot * sb // g, ((t.slot + t.n_slots) * sb - 1) // g
        units.update((t.head, t.tier, u) for u in range(lo, hi + 1))
    return sum(gran[tier] for _, tier, _ in units)


__all__ = ["Layout", "Tier", "KVMUConfig", "Transfer", "KVMU"]
