"""HCU: the DRE's hash clustering unit, bit-exact (V-Rex §IV-B, Fig. 11; ReSV §III-A).

Hardware (Table III: 0.01 mm², 3.0 mW per core): a *current* hash-bit memory (128 B: the new
frame's codes), a *key-cache* hash-bit memory (4 KB: the in-scope cluster codes of the HC table),
one 16-input XOR/popcount accumulator, a comparator against ``Th_hd`` and the write port to the
hash-cluster (HC) table.

Function: exactly :func:`vrex.resv.clustering.cluster_frame_ref` (tokens in arrival order; the
candidate order is the valid in-scope clusters, then the frame's own earlier tokens or leaders;
``nearest`` or ``first`` rule; ties to the earliest candidate; strict ``d < Th`` unless
``inclusive``; same output encoding and same comparison count). Hamming distances are integers, so
the unit is exact by construction; what the model adds is the *timing* of the bit-serial datapath:

* a distance takes ``ceil(n_hp / 16)`` XOR+popcount steps, one per cycle, low bits first;
* with ``early_abort`` the accumulator stops as soon as the partial distance makes the candidate
  ineligible (``>= Th``, or ``> Th`` when inclusive) or, for ``nearest``, no better than the best
  found so far (a later candidate must be *strictly* closer to win a tie). This changes cycles only,
  never the result (the tests hold both settings equal);
* candidate codes stream through the 4 KB key-cache memory in tiles of ``4096 // B`` codes and the
  frame's codes through the 128 B current memory in tiles of ``128 // B`` tokens; every tile load is
  counted (bytes from DRAM), the compare loop is tiled but keeps per-token best registers, so
  tiling never changes the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Rule = Literal["nearest", "first"]
Intra = Literal["tokens", "leaders"]


@dataclass(frozen=True)
class HCUConfig:
    """HCU parameters. Defaults: the paper's settings (N_hp = 32, Th_hd = 7) and memories."""

    n_hp: int = 32
    threshold: int = 7
    inclusive: bool = False
    rule: Rule = "nearest"
    intra: Intra = "tokens"
    xor_bits: int = 16  # inputs of the XOR/popcount accumulator
    cur_mem_bytes: int = 128
    cache_mem_bytes: int = 4096
    early_abort: bool = True

    @property
    def code_bytes(self) -> int:
        return (self.n_hp + 7) // 8

    @property
    def steps_per_distance(self) -> int:
        return -(-self.n_hp // self.xor_bits)


@dataclass
class HCUHeadResult:
    """One head's frame: the software encoding plus the datapath counters."""

    assign: list[int]  # < C: candidate index; >= C: C + leader position (software encoding)
    is_leader: list[bool]
    comparisons: int  # as the software counts them
    xor_steps: int  # XOR/popcount accumulator steps actually taken (= cycles of the datapath)
    cache_tiles: int  # key-cache memory loads
    frame_tiles: int  # current-frame memory loads
    dram_bytes: int  # code bytes loaded into the two memories
    table_writes: int  # HC-table entries written (one per token + one per new cluster)


def _as_int(code: bytes | list[int] | torch.Tensor) -> int:
    """A packed code (little-endian bytes, see vrex.resv.hashing) as one Python integer."""
    return int.from_bytes(bytes(int(b) for b in code), "little")


def _distance(a: int, b: int, cfg: HCUConfig, stop_at: int | None) -> tuple[int, int]:
    """Hamming distance via 16-bit XOR/popcount steps; returns ``(distance or partial, steps)``.

    ``stop_at``: abort once the partial distance reaches it (the result is then >= stop_at).
    """
    x = a ^ b
    mask = (1 << cfg.xor_bits) - 1
    acc = 0
    for k in range(cfg.steps_per_distance):
        acc += ((x >> (k * cfg.xor_bits)) & mask).bit_count()
        if stop_at is not None and acc >= stop_at:
            return acc, k + 1
    return acc, cfg.steps_per_distance


def hcu_frame_head(
    new_codes: list,
    cand_codes: list,
    cfg: HCUConfig = HCUConfig(),
) -> HCUHeadResult:
    """Cluster one head's frame. ``cand_codes[j] is None`` marks an invalid (padded) slot."""
    C = len(cand_codes)
    B = cfg.code_bytes
    new = [_as_int(c) for c in new_codes]
    cands = [(j, _as_int(c)) for j, c in enumerate(cand_codes) if c is not None]
    limit = cfg.threshold + 1 if cfg.inclusive else cfg.threshold  # eligible iff d < limit
    assign: list[int] = []
    leader: list[bool] = []
    comparisons = steps = 0
    for t, code in enumerate(new):
        order = list(cands)  # (target, code); targets: candidate idx, or the cluster of token s
        for s in range(t):
            if cfg.intra == "tokens" or leader[s]:
                order.append((assign[s], new[s]))
        chosen = best_d = found_at = None
        for k, (target, other) in enumerate(order):
            stop = limit
            if cfg.rule == "nearest" and best_d is not None:
                stop = min(stop, best_d)  # a later candidate must be strictly closer
            d, st = _distance(code, other, cfg, stop if cfg.early_abort else None)
            steps += st
            if d < limit and (best_d is None or d < best_d):
                best_d, chosen = d, target
                if cfg.rule == "first":
                    found_at = k
                    break
        if cfg.rule == "first" and found_at is not None:
            comparisons += found_at + 1
        else:  # nearest always compares every candidate; first without a match scans them all
            comparisons += len(order)
        if chosen is None:
            assign.append(C + t)
            leader.append(True)
        else:
            assign.append(chosen)
            leader.append(False)
    T = len(new)
    cache_per_tile = max(1, cfg.cache_mem_bytes // B)
    frame_per_tile = max(1, cfg.cur_mem_bytes // B)
    frame_tiles = -(-T // frame_per_tile) if T else 0
    # every frame tile re-streams the candidate tiles (the candidate list is shared by its tokens)
    cache_tiles = frame_tiles * (-(-len(cands) // cache_per_tile)) if cands else 0
    dram = T * B + frame_tiles * len(cands) * B if T else 0
    return HCUHeadResult(assign, leader, comparisons, steps, cache_tiles, frame_tiles, dram, T + sum(leader))


@dataclass
class HCUResult:
    """All heads of one frame, as tensors (same encoding as ``vrex.resv.clustering.FrameAssignment``)."""

    assign: torch.Tensor  # int64 [H, T]
    is_leader: torch.Tensor  # bool [H, T]
    comparisons: torch.Tensor  # int64 [H]
    num_candidates: int
    heads: list[HCUHeadResult] = field(repr=False, default_factory=list)

    @property
    def cycles(self) -> int:
        """Datapath cycles if the heads run back to back on one HCU (tile loads overlap compute)."""
        return sum(h.xor_steps for h in self.heads)


def hcu_frame(
    new_codes: torch.Tensor,
    cand_codes: torch.Tensor,
    cand_valid: torch.Tensor | None = None,
    cfg: HCUConfig = HCUConfig(),
) -> HCUResult:
    """Tensor front end: ``new_codes uint8 [H, T, B]``, ``cand_codes uint8 [H, C, B]``, ``cand_valid bool [H, C]``."""
    H, T, B = new_codes.shape
    if B != cfg.code_bytes:
        raise ValueError(f"codes have {B} bytes, the HCU is configured for n_hp={cfg.n_hp} ({cfg.code_bytes} bytes)")
    C = cand_codes.shape[1]
    if cand_valid is None:
        cand_valid = torch.ones(H, C, dtype=torch.bool)
    heads = []
    for h in range(H):
        nc = [new_codes[h, t].tolist() for t in range(T)]
        cc = [cand_codes[h, j].tolist() if bool(cand_valid[h, j]) else None for j in range(C)]
        heads.append(hcu_frame_head(nc, cc, cfg))
    assign = torch.tensor([r.assign for r in heads], dtype=torch.int64).reshape(H, T)
    lead = torch.tensor([r.is_leader for r in heads], dtype=torch.bool).reshape(H, T)
    comps = torch.tensor([r.comparisons for r in heads], dtype=torch.int64)
    return HCUResult(assign, lead, comps, C, heads)


__all__ = ["HCUConfig", "HCUHeadResult", "HCUResult", "hcu_frame_head", "hcu_frame"]
