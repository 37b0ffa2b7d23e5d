"""WTU: the DRE's WiCSum thresholding unit with early exit, bit-exact (V-Rex §IV-B, Fig. 12).

Hardware (Table III: 0.02 mm², 39 mW per core): an 8 KB score memory (4096 BF16 scores from the
LXE's Q·Kcᵀ), an 8 KB token-count memory (4096 x 16-bit TC), upper/lower bucket comparators, TC
multipliers, a 16-wide adder tree, a cumulative-sum register, the threshold comparator and a
bucket-range updater; one 16-lane core.

Per row (one query token of one query head) the model runs, in order:

1. **Preprocess** (two 16-wide passes over the row): min and max of the valid BF16 scores; the
   normalisation of :func:`vrex.resv.wicsum.normalize_scores` in float32 with the same operations
   (``softmax``: exp of ``(s - max) * scale``, the VPE's exp modelled as torch's float32 exp;
   ``shift_min``; ``relu``; ``raw``); the products ``p = w * TC`` (exact: a float32 times a 16-bit
   integer fits in 40 bits); the weighted row sum ``Sum``; ``Th = ratio * Sum``.
2. **Bucket sort**: sort keys (``w``, or ``p`` with ``sort_by="weighted"``) fall into ``NB``
   equal-width buckets between the row's max and min key, with the software's float64 formula
   ``min(NB-1, floor((max - key) / (max - min) * NB))`` (bucket 0 on top).
3. **Top-down scan with early exit**: buckets are visited from the top; a bucket's products go
   through the adder tree into the cumulative sum. If some prefix of the bucket (in sorted order)
   would pass ``Th`` -- its positive products come first, so the test is
   ``Acc + sum(p > 0) > Th`` (or ``Acc + p_first`` when none is positive) -- the bucket-range updater re-buckets that bucket's key range
   (recursively) until the crossing group holds at most 16 elements or only equal keys, which are
   then ordered by key and cluster index (the stable tie rule) and taken one by one up to the first
   ``Acc > Th``. Rows where nothing passes take every valid cluster.

Number formats. Scores are stored in BF16 and counts in 16 bits (the memories' widths); weights
are float32; products ``w * TC`` are exact. The preprocess aligns them to the row's largest product
and keeps ``GRID_BITS`` = 40 bits below it (``P = floor(p * 2^(40 - e))``, ``max |p| < 2^e``); the
cumulative sum and ``Sum`` are exact integers of that grid in a fixed-point accumulator (``acc_bits``
reports the width a row needed: 40 bits plus ``log2`` of the row's clusters plus a sign), so
visiting order never matters; ``Th`` is an IEEE binary64 product ``ratio * Sum`` (one multiply per
row) and the comparison ``Acc > Th`` is exact. The software (:func:`vrex.resv.wicsum.wicsum_select`)
computes with the same grid and the same rounding, so the two agree bit for bit on every input.

``scanned`` is the software's bucketed definition: the valid clusters in buckets ``0..b*``
(``b*`` = bucket of the last cluster taken). Cycles: ``2*ceil(n/16)`` preprocess, ``ceil(m/16)``
per visited bucket of ``m`` elements, one pass per refinement level, ``FINAL_LATENCY`` for the
last <= 16-element group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from vrex.resv.wicsum import grid_row

from .bf16 import to_bf16

Norm = Literal["softmax", "shift_min", "relu", "raw"]
SortBy = Literal["score", "weighted"]
FINAL_LATENCY = 4  # cycles: 16-input sorting network + prefix adder for the last group [U]


@dataclass(frozen=True)
class WTUConfig:
    """WTU parameters; defaults follow the paper (ratio 0.3, 16 lanes, 8 KB memories)."""

    ratio: float = 0.3
    norm: Norm = "softmax"
    scale: float | None = None  # None -> 1.0, as normalize_scores
    sort_by: SortBy = "score"
    num_buckets: int = 16  # [U] the paper does not give the bucket count
    lanes: int = 16
    score_entries: int = 4096  # 8 KB of BF16
    tc_bits: int = 16  # 8 KB of 16-bit counts


@dataclass
class WTURow:
    """One row's outcome and counters."""

    taken: list[int]  # selected cluster indices (ascending)
    t_star: int  # number taken
    scanned: int  # valid clusters in the visited buckets (software's bucketed definition)
    cycles: int
    acc_bits: int  # fixed-point accumulator width this row needed for exactness
    n_valid: int


def normalize(scores: torch.Tensor, valid: torch.Tensor, cfg: WTUConfig) -> torch.Tensor:
    """Row-wise float32 normalisation ``[..., R, C]`` (same operations as the software)."""
    s = scores.to(torch.float32)
    sc = 1.0 if cfg.scale is None else float(cfg.scale)
    v = valid.unsqueeze(-2).expand_as(s)
    if cfg.norm == "softmax":
        mx = s.masked_fill(~v, float("-inf")).amax(-1, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        w = torch.exp((s - mx) * sc)
    elif cfg.norm == "shift_min":
        mn = s.masked_fill(~v, float("inf")).amin(-1, keepdim=True)
        mn = torch.where(torch.isfinite(mn), mn, torch.zeros_like(mn))
        w = (s - mn) * sc
    elif cfg.norm == "relu":
        w = (s * sc).clamp(min=0)
    elif cfg.norm == "raw":
        w = s * sc
    else:
        raise ValueError(f"unknown normalisation {cfg.norm!r}")
    return w.masked_fill(~v, 0.0)


def _bucket(key: float, mx: float, span: float, nb: int) -> int:
    # same float64 operations, in the same order, as the software's _bucket_scanned
    return 0 if span <= 0 else min(nb - 1, math.floor((mx - key) / span * nb))


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _max_prefix(members) -> int:
    """Largest non-empty prefix sum of a group in sorted order (positive products come first)."""
    pos = [p for _, _, p in members if p > 0]
    if pos:
        return sum(pos)
    return min(members, key=lambda m: (-m[0], m[1]))[2]  # all <= 0: the first element alone


def _refine(members, acc: int, th: float, cfg: WTUConfig):
    """Find the crossing inside a bucket; ``members``: (key, idx, p_int) in index order.

    Returns (indices taken from this group, cycles). Caller guarantees a crossing exists.
    """
    keys = [m[0] for m in members]
    if len(members) <= cfg.lanes or max(keys) == min(keys):
        cyc = FINAL_LATENCY if len(members) <= cfg.lanes else _ceil(len(members), cfg.lanes)
        taken = []
        for key, idx, p in sorted(members, key=lambda m: (-m[0], m[1])):
            acc += p
            taken.append(idx)
            if acc > th:  # an int against a float: Python compares exactly
                return taken, cyc
        raise AssertionError("WTU refine: no crossing in the crossing bucket")
    hi, lo = max(keys), min(keys)
    nb = max(2, cfg.num_buckets)  # >= 2 sub-buckets: max and min land apart, so the group shrinks
    subs: list[list] = [[] for _ in range(nb)]
    for m in members:
        subs[_bucket(m[0], hi, hi - lo, nb)].append(m)
    cyc = _ceil(len(members), cfg.lanes)  # one re-bucketing pass
    taken: list[int] = []
    for sub in subs:
        if not sub:
            continue
        if acc + _max_prefix(sub) > th:
            t2, c2 = _refine(sub, acc, th, cfg)
            return taken + t2, cyc + c2
        acc += sum(p for _, _, p in sub)
        taken += [i for _, i, _ in sub]
        cyc += _ceil(len(sub), cfg.lanes)
    raise AssertionError("WTU refine: crossing lost")


def wtu_row(weights: list[float], counts: list[int], valid: list[bool], cfg: WTUConfig) -> WTURow:
    """Select one row from float32 ``weights`` (already normalised), 16-bit ``counts`` and ``valid``."""
    lim = 1 << cfg.tc_bits
    n = len(weights)
    idx = [j for j in range(n) if valid[j]]
    pre_cycles = 2 * _ceil(n, cfg.lanes)
    if not idx:
        return WTURow([], 0, 0, pre_cycles, 0, 0)
    for j in idx:
        if not 0 <= counts[j] < lim:
            raise ValueError(f"token count {counts[j]} does not fit the {cfg.tc_bits}-bit TC memory")
    # products (exact in binary64) on the row's fixed-point grid, aligned to the largest one (the software's)
    prods = {j: float(weights[j]) * counts[j] for j in idx}
    P = dict(zip(prods, grid_row(list(prods.values()))))
    total = sum(P.values())
    th = float(cfg.ratio) * float(total)  # binary64 Sum (one rounding) times ratio, RNE
    key = {j: (float(weights[j]) if cfg.sort_by == "score" else prods[j]) for j in idx}
    mx, mn = max(key.values()), min(key.values())
    nb = cfg.num_buckets
    buckets: list[list] = [[] for _ in range(nb)]
    for j in idx:
        buckets[_bucket(key[j], mx, mx - mn, nb)].append((key[j], j, P[j]))
    acc, taken, cycles, scanned = 0, [], pre_cycles, 0
    peak = max(abs(total), 1)
    for members in buckets:
        if not members:
            continue
        scanned += len(members)
        cycles += _ceil(len(members), cfg.lanes)
        best = _max_prefix(members)
        if acc + best > th:
            t2, c2 = _refine(members, acc, th, cfg)
            taken += t2
            cycles += c2
            break
        acc += sum(p for _, _, p in members)
        peak = max(peak, abs(acc), abs(acc - sum(p for _, _, p in members) + best))
        taken += [i for _, i, _ in members]
    lsb = min(((p & -p).bit_length() - 1) for p in P.values() if p) if any(P.values()) else 0
    acc_bits = max(peak.bit_length() - lsb, 1) + 1  # + sign
    return WTURow(sorted(taken), len(taken), scanned, cycles, acc_bits, len(idx))


@dataclass
class WTUResult:
    """Rows ``[..., R]`` over clusters ``[..., C]`` (same layout as ``vrex.resv.wicsum.WiCSumResult``)."""

    selected: torch.Tensor  # bool [..., R, C]
    taken: torch.Tensor  # int64 [..., R]
    scanned: torch.Tensor  # int64 [..., R]
    cycles: int  # summed over rows
    acc_bits: int  # max over rows

    def union(self) -> torch.Tensor:
        return self.selected.any(-2)


def wtu_select(
    scores: torch.Tensor,
    counts: torch.Tensor,
    valid: torch.Tensor | None = None,
    cfg: WTUConfig = WTUConfig(),
) -> WTUResult:
    """Run the WTU on ``scores [..., R, C]`` (stored as BF16), ``counts [..., C]``, ``valid [..., C]``."""
    *lead, R, C = scores.shape
    if C > cfg.score_entries:
        raise ValueError(f"{C} clusters exceed the score memory ({cfg.score_entries} entries)")
    if valid is None:
        valid = torch.ones(*lead, C, dtype=torch.bool)
    valid = valid.expand(*lead, C)
    w = normalize(to_bf16(scores), valid, cfg)
    cnt = counts.expand(*lead, C)
    sel = torch.zeros(*lead, R, C, dtype=torch.bool)
    taken = torch.zeros(*lead, R, dtype=torch.int64)
    scanned = torch.zeros(*lead, R, dtype=torch.int64)
    cycles = bits = 0
    for pos in torch.cartesian_prod(*[torch.arange(d) for d in lead]).reshape(-1, len(lead)) if lead else [()]:
        ix = tuple(int(i) for i in pos)
        v = valid[ix].tolist()
        c = [int(x) for x in cnt[ix].tolist()]
        for r in range(R):
            row = wtu_row(w[ix + (r,)].tolist(), c, v, cfg)
            if row.taken:
                sel[ix + (r,)][row.taken] = True
            taken[ix + (r,)] = row.t_star
            scanned[ix + (r,)] = row.scanned
            cycles += row.cycles
            bits = max(bits, row.acc_bits)
    return WTUResult(sel, taken, scanned, cycles, bits)


__all__ = ["WTUConfig", "WTURow", "WTUResult", "normalize", "wtu_row", "wtu_select", "FINAL_LATENCY"]
