"""ReSV step B: WiCSum (weighted cumulative sum) thresholding, replacing fixed top-k.

Pure tensor functions. The bit-exact hardware model (WTU) reproduces :func:`wicsum_ref`.

Definition, per query row ``i`` (one query token of one query head), over ``C`` clusters
--------------------------------------------------------------------------------------
1. **Scores.** ``s_ij = q_i . Kc_j`` (float32; ``Kc_j`` = cluster mean key).
2. **Normalisation** (:func:`normalize_scores`; [U] the paper does not say, and raw logits can be
   negative, which makes "cumulative sum passes ratio x total" ill defined). Modes:

   * ``"softmax"`` (default): ``w_ij = exp(scale * (s_ij - max_j s_ij))`` with
     ``scale = 1/sqrt(D)`` by default: the softmax numerator, so ``w_ij * TC_j`` estimates the
     attention mass of cluster ``j`` and the rule keeps clusters covering ``ratio`` of it.
   * ``"shift_min"``: ``w_ij = scale * (s_ij - min_j s_ij)`` (the lowest cluster gets weight 0).
   * ``"relu"``: ``w_ij = max(scale * s_ij, 0)``.
   * ``"raw"``: ``w_ij = scale * s_ij`` (the literal paper rule). Defined but degenerate with
     negative logits: a negative ``Sum`` gives a negative ``Th`` that the first running sum may
     already exceed (one cluster taken), and ``Sum = 0`` takes everything (step 4).

   Max/min run over valid clusters only; invalid (padded) clusters get weight 0.
3. **Sort.** Valid clusters are sorted by a key in descending order, **stable** (ties: lower
   cluster index first). ``sort_by="score"`` (default, as the paper: "sort the scores") uses
   ``w_ij``; ``sort_by="weighted"`` uses ``w_ij * TC_j``. Invalid clusters come last and are never
   taken.
4. **Accumulate and exit.** Products ``p = w * TC`` are formed in float64 (``w`` is float32 and
   ``TC < 2^29``: exact) and put on one fixed-point grid per row, aligned to its largest product:
   ``e`` = the exponent with ``max_j |p_j| < 2^e`` (``frexp``), ``P_j = floor(p_j * 2^(GRID_BITS - e))``,
   an integer with ``|P_j| < 2^40`` (:data:`GRID_BITS`; products below ``2^-40`` of the largest one
   count as 0 or -1). Sums of ``P`` are exact integers (``C < 2^22`` keeps them under ``2^62``), so the
   order of accumulation does not matter: ``Sum = sum_j P_j``, ``Th = ratio * float64(Sum)`` (one
   rounding each, IEEE round to nearest) and ``Acc(t) = P_σ(1) + ... + P_σ(t)`` compared with ``Th``
   exactly. The row takes the first ``t*`` clusters in sorted order, ``t*`` = the smallest ``t`` with
   ``Acc(t) > Th`` (strict), or ``t* = C_valid`` when no prefix passes (``ratio >= 1``, all weights
   0, or negative "raw" sums): no early exit, everything taken. A row with no valid cluster takes
   nothing (``t* = 0``). This is the WTU's arithmetic (:mod:`vrex.hw.wtu`: a wide fixed-point
   accumulator, ``Th`` one binary64 product), so the hardware model equals this function on every
   input, and a fast path may find ``t*`` from bucket sums without sorting the whole row
   (``vrex/kv/fast/kernels.cpp``). Until session 24 (issue 15) the products were summed in float64
   in sorted order, which only a full sort reproduces.
5. **Union.** The selection of a KV head is the union over its rows: every query token of every
   query head in its GQA group (the caller flattens them into rows). Clusters map to tokens
   through the HC table.

**Elements scanned before early exit** (the WTU's work): ``scanned_i = t*`` clusters (the
exact-sort definition). With ``num_buckets = NB`` (bucketed WTU, [U] bucket count unstated),
the row's valid keys are split into ``NB`` equal-width buckets between the row's min and max key,
``b_j = min(NB - 1, floor((max - key_j) / (max - min) * NB))`` computed in float64 (bucket 0 is
the top; all keys in bucket 0 when ``max == min``); buckets are consumed top-down and
``scanned_bucketed_i`` = number of valid clusters in buckets ``0 .. b*``, ``b*`` = bucket of the
last taken cluster (0 when ``t* = 0``). The *early-exit scan fraction* of a batch of rows is
``sum_i scanned_i / sum_i C_valid_i`` (ratio of sums).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

ScoreNorm = Literal["softmax", "shift_min", "relu", "raw"]
SortBy = Literal["score", "weighted"]

#: bits of a row's fixed-point grid below its largest product (step 4)
GRID_BITS = 40
#: limits that keep the products exact in float64 and the integer sums under 2^62
MAX_COUNT = 1 << 29
MAX_CLUSTERS = 1 << 22


def _check_limits(n_clusters: int, max_count: int) -> None:
    if n_clusters >= MAX_CLUSTERS:
        raise ValueError(f"WiCSum over {n_clusters} clusters: at most {MAX_CLUSTERS - 1} per row")
    if max_count >= MAX_COUNT:
        raise ValueError(f"a cluster token count of {max_count} exceeds WiCSum's limit of {MAX_COUNT - 1}")


def grid_products(prod: torch.Tensor) -> torch.Tensor:
    """Step 4's fixed-point products: ``float64 [..., C]`` (0 for invalid clusters) -> ``int64 [..., C]``
    on each row's grid, ``floor(p * 2^(GRID_BITS - e))`` with ``max |p| < 2^e``."""
    _, e = torch.frexp(prod.abs().amax(-1, keepdim=True) if prod.shape[-1] else prod)
    return torch.floor(torch.ldexp(prod, GRID_BITS - e)).to(torch.int64)


def grid_row(prods: list[float]) -> list[int]:
    """:func:`grid_products` for one row of Python floats (the per-row references: :func:`wicsum_ref`
    and the WTU model), with Python's exact ``math.frexp``/``math.ldexp``."""
    e = math.frexp(max((abs(p) for p in prods), default=0.0))[1]
    return [math.floor(math.ldexp(p, GRID_BITS - e)) for p in prods]


def threshold_floor(total: torch.Tensor, ratio: float) -> torch.Tensor:
    """``floor(ratio * float64(Sum))`` as int64, clamped to +-2^62 (beyond every reachable ``Acc``):
    for an integer ``Acc``, ``Acc > Th`` exactly when ``Acc > floor(Th)``."""
    th = float(ratio) * total.to(torch.float64)
    return torch.floor(th).clamp(-(2.0**62), 2.0**62).to(torch.int64)


@dataclass
class WiCSumResult:
    """Output of :func:`wicsum_select` for rows ``[..., R]`` over clusters ``[..., C]``."""

    selected: torch.Tensor  # bool [..., R, C]: cluster taken by the row
    taken: torch.Tensor  # int64 [..., R]: t*, clusters taken = scanned (exact-sort definition)
    n_valid: torch.Tensor  # int64 [...]: valid clusters
    scanned_bucketed: torch.Tensor | None  # int64 [..., R] when num_buckets is given

    def union(self) -> torch.Tensor:
        """Clusters taken by any row, ``bool [..., C]``."""
        return self.selected.any(-2)

    def scan_fraction(self) -> float:
        """Early-exit scan fraction over all rows (ratio of sums); 0.0 when nothing is valid."""
        scanned = self.scanned_bucketed if self.scanned_bucketed is not None else self.taken
        R = self.taken.shape[-1]
        denom = float(self.n_valid.sum()) * R
        return float(scanned.sum()) / denom if denom > 0 else 0.0


def normalize_scores(
    scores: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    mode: ScoreNorm = "softmax",
    scale: float | None = None,
) -> torch.Tensor:
    """Non-negative (except ``"raw"``) weights ``float32 [..., R, C]`` from logits ``scores``.

    ``valid`` is ``bool [..., C]`` (broadcast over rows). ``scale`` defaults to ``1.0`` here; the
    ReSV policy passes ``1/sqrt(head_dim)`` (its default) explicitly.
    """
    s = scores.to(torch.float32)
    sc = 1.0 if scale is None else float(scale)
    v = None if valid is None else valid.unsqueeze(-2).expand_as(s)
    if mode == "softmax":
        m = s if v is None else s.masked_fill(~v, float("-inf"))
        mx = m.amax(-1, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        w = torch.exp((s - mx) * sc)
    elif mode == "shift_min":
        m = s if v is None else s.masked_fill(~v, float("inf"))
        mn = m.amin(-1, keepdim=True)
        mn = torch.where(torch.isfinite(mn), mn, torch.zeros_like(mn))
        w = (s - mn) * sc
    elif mode == "relu":
        w = (s * sc).clamp(min=0)
    elif mode == "raw":
        w = s * sc
    else:
        raise ValueError(f"score normalisation must be one of softmax, shift_min, relu, raw; got {mode!r}")
    if v is not None:
        w = w.masked_fill(~v, 0.0)
    return w


def wicsum_select(
    weights: torch.Tensor,
    counts: torch.Tensor,
    ratio: float,
    valid: torch.Tensor | None = None,
    *,
    sort_by: SortBy = "score",
    num_buckets: int | None = None,
) -> WiCSumResult:
    """Vectorised WiCSum over rows ``weights float32 [..., R, C]``, counts ``int [..., C]``.

    ``valid`` is ``bool [..., C]``; leading dims (e.g. KV heads) batch independent problems.
    """
    w = weights.to(torch.float32)
    *lead, R, C = w.shape
    if valid is None:
        valid = torch.ones(*lead, C, dtype=torch.bool)
    cnt = counts.to(torch.float64).expand(*lead, C)
    vrow = valid.unsqueeze(-2).expand(*lead, R, C)
    prod = w.to(torch.float64) * cnt.unsqueeze(-2)
    prod = prod.masked_fill(~vrow, 0.0)
    key = w.to(torch.float64) if sort_by == "score" else prod
    if sort_by not in ("score", "weighted"):
        raise ValueError(f"sort_by must be 'score' or 'weighted', got {sort_by!r}")
    key = key.masked_fill(~vrow, float("-inf"))
    if C:
        _check_limits(C, int(counts.max()))
    skey, order = torch.sort(key, dim=-1, descending=True, stable=True)
    acc = torch.cumsum(grid_products(prod).gather(-1, order), dim=-1)  # exact integer prefix sums
    n_valid = valid.sum(-1)  # [...]
    nv = n_valid.unsqueeze(-1).expand(*lead, R)
    if C == 0:
        sel = torch.zeros(*lead, R, 0, dtype=torch.bool)
        zeros = torch.zeros(*lead, R, dtype=torch.int64)
        return WiCSumResult(sel, zeros, n_valid, zeros.clone() if num_buckets else None)
    th = threshold_floor(acc[..., -1:], ratio)  # invalid clusters add 0: the last prefix is Sum
    pos = torch.arange(C)
    passed = (acc > th) & (pos < nv.unsqueeze(-1))
    first = passed.to(torch.int8).argmax(-1)  # first True
    taken = torch.where(passed.any(-1), first + 1, nv)
    take_sorted = pos < taken.unsqueeze(-1)
    sel = torch.zeros(*lead, R, C, dtype=torch.bool).scatter(-1, order, take_sorted)
    scanned_b = None
    if num_buckets:
        scanned_b = _bucket_scanned(skey, taken, nv, int(num_buckets))
    return WiCSumResult(sel, taken, n_valid, scanned_b)


def _bucket_scanned(skey: torch.Tensor, taken: torch.Tensor, nv: torch.Tensor, nb: int) -> torch.Tensor:
    C = skey.shape[-1]
    pos = torch.arange(C)
    vmask = pos < nv.unsqueeze(-1)
    mx = skey[..., :1]
    mn = skey.gather(-1, (nv - 1).clamp(min=0).unsqueeze(-1))
    span = mx - mn
    safe = torch.where(span > 0, span, torch.ones_like(span))
    b = torch.floor((mx - skey) / safe * nb).clamp(max=nb - 1)
    b = torch.where(span > 0, b, torch.zeros_like(b))
    b = torch.where(vmask, b, torch.full_like(b, float(nb)))
    last = b.gather(-1, (taken - 1).clamp(min=0).unsqueeze(-1))
    last = torch.where(taken.unsqueeze(-1) > 0, last, torch.zeros_like(last))
    return ((b <= last) & vmask).sum(-1)


def wicsum_ref(
    weights: list[float],
    counts: list[int],
    ratio: float,
    valid: list[bool] | None = None,
    *,
    sort_by: SortBy = "score",
    num_buckets: int | None = None,
) -> tuple[list[int], int, int | None]:
    """Reference WiCSum for ONE row, plain Python loops.

    ``weights`` are float32 values (as Python floats). Returns ``(taken cluster indices in sorted
    order, t*, scanned_bucketed or None)``.
    """
    C = len(weights)
    valid = [True] * C if valid is None else list(valid)
    idx = [j for j in range(C) if valid[j]]
    if C:
        _check_limits(C, max(int(c) for c in counts))
    prods = {j: float(weights[j]) * float(counts[j]) for j in idx}
    if sort_by == "score":
        keyf = {j: float(weights[j]) for j in idx}
    else:
        keyf = dict(prods)
    order = sorted(idx, key=lambda j: (-keyf[j], j))
    grid = dict(zip(prods, grid_row(list(prods.values()))))
    th = float(ratio) * float(sum(grid.values()))  # float(int): round to nearest, as int64 -> float64
    acc = 0
    t_star = len(order)
    for t, j in enumerate(order, start=1):
        acc += grid[j]
        if acc > th:  # int against float: Python compares exactly
            t_star = t
            break
    taken = order[:t_star]
    scanned_b = None
    if num_buckets:
        scanned_b = 0 if t_star == 0 else _ref_bucket_count(order, keyf, num_buckets, taken[-1])
    return taken, t_star, scanned_b


def _ref_bucket_count(order: list[int], keyf: dict[int, float], nb: int, last: int) -> int:
    mx = keyf[order[0]]
    mn = keyf[order[-1]]
    span = mx - mn

    def bucket(j: int) -> int:
        if span <= 0:
            return 0
        return min(nb - 1, math.floor((mx - keyf[j]) / span * nb))

    b_last = bucket(last)
    return sum(1 for j in order if bucket(j) <= b_last)


def cap_clusters(chosen: torch.Tensor, priority: torch.Tensor, counts: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """A token budget on a WiCSum selection (vrex's addition, not the paper's): per KV head, the chosen
    clusters in descending ``priority`` (stable: ties keep the lower cluster index) while their member
    counts sum to at most ``max_tokens``; the first cluster that does not fit ends the head's selection.

    ``chosen`` bool ``[H, C]``, ``priority`` float ``[H, C]`` (ReSV: the cluster's largest raw score
    ``q . Kc`` over the head's query rows), ``counts`` ``[H, C]`` member tokens. Returns bool ``[H, C]``,
    a subset of ``chosen``. WiCSum reads a share of the past, so its reads grow with the stream; the cap
    bounds them, and with them a step's attention cost.
    """
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    if chosen.shape[1] == 0:
        return chosen
    key = torch.where(chosen, priority.to(torch.float64), torch.full_like(priority, -math.inf, dtype=torch.float64))
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    taken = torch.where(chosen, counts, torch.zeros_like(counts)).gather(1, order).cumsum(1)
    keep = torch.zeros_like(chosen)
    keep.scatter_(1, order, (taken <= max_tokens) & chosen.gather(1, order))
    return keep


__all__ = ["GRID_BITS", "ScoreNorm", "SortBy", "WiCSumResult", "cap_clusters", "grid_products", "grid_row", "normalize_scores",
           "threshold_floor", "wicsum_select", "wicsum_ref"]
