"""The DRE's timing in the simulator comes from the bit-exact units (HCU, WTU) run on concrete inputs.

For one layer of a step the simulator needs the HCU's cycles (clustering the step's new keys of a KV
head against the in-scope cluster codes) and the WTU's cycles (WiCSum over the clusters for every
query row). :func:`unit_cycles` runs :func:`vrex.hw.hcu.hcu_frame` and :func:`vrex.hw.wtu.wtu_select`
on a :class:`DRESample` (one KV head's inputs: new codes, candidate codes, the LXE's BF16 scores of
its query rows, token counts) and returns their cycle counts; the simulator multiplies by KV heads
and streams. A sample is either given (tests, a caller with real inputs) or drawn by
:func:`synth_sample`: clusters' mean keys are Gaussian, the step's keys are noisy copies of in-scope
clusters (so some join and some found new clusters), codes and scores come from the LXE's BF16
datapath (:mod:`vrex.hw.lxe`) with BF16 hyperplanes, counts average the cluster size. Samples are
cached per shape, so a check or a sweep runs each shape once.

The KVMU's transfers are timed the same way: :func:`kvmu_run_tokens` stores a synthetic stream of
the step's shape in the bit-exact :class:`vrex.hw.kvmu.KVMU` (cluster layout, the device window as
its first tier, regrouping per clustering scope on offload), selects whole clusters at random up to
the step's ratio and returns the mean run per transfer that :meth:`KVMU.transfer_list` produces.
The stream (:func:`temporal_stream`): ``live`` clusters are open at a time, every token of a frame
joins one of them (at random), and the oldest is replaced ``tokens_per_frame / cluster_size`` times
per frame on a steady schedule (so clusters average ``cluster_size`` tokens and span ``live x cluster_size /
tokens_per_frame`` frames, the way our traces' clusters span frames).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import random
from functools import lru_cache

import torch

from .bf16 import to_bf16
from .hcu import HCUConfig, hcu_frame
from .kvmu import KVMU, KVMUConfig, Tier
from .lxe import lxe_hash_codes, lxe_scores
from .wtu import WTUConfig, wtu_select

MAX_ROWS = 16  # WTU rows sampled per KV head (cycles scale by rows / sampled rows)
MAX_KVMU_TOKENS = 65536  # longest KVMU sample: runs are a per-chunk statistic, stable over many chunks
KVMU_SELECTIONS = 4  # random whole-cluster selections per KVMU sample (runs pooled over them)


@dataclass(frozen=True)
class DRESample:
    """One KV head's DRE inputs for one layer of a step."""

    new_codes: torch.Tensor  # uint8 [T, n_hp/8]: the step's new keys, hashed
    cand_codes: torch.Tensor  # uint8 [Cs, n_hp/8]: in-scope cluster codes
    scores: torch.Tensor  # float32 (BF16 values) [R, C]: the LXE's Q . Kc for R query rows
    counts: torch.Tensor  # int64 [C]: tokens per cluster
    rows_total: int  # query rows of the KV head in the step (T x query heads per KV head)
    n_hp: int = 32
    threshold: int = 7
    ratio: float = 0.3
    scale: float | None = None  # score scale of the shift_min normalisation (the ReSV policy: 1/sqrt(D))


@dataclass(frozen=True)
class UnitCycles:
    """Cycle counts of one KV head for one layer (HCU: the step's tokens; WTU: all its rows)."""

    hcu: float
    wtu: float
    scan_fraction: float  # the WTU's early-exit scan fraction on the sample


def unit_cycles(s: DRESample) -> UnitCycles:
    """Run the bit-exact HCU and WTU on the sample and count their cycles."""
    hcu = 0
    if s.new_codes.shape[0]:
        hcu = hcu_frame(s.new_codes[None], s.cand_codes[None], cfg=HCUConfig(n_hp=s.n_hp, threshold=s.threshold)).cycles
    R, C = s.scores.shape
    wtu, frac = 0.0, 0.0
    if R and C:
        # rows longer than the 4096-entry score memory stream through it in pieces; the cycles are the
        # same per element, so the unit runs with a memory that holds the row (refills not timed)
        cfg = WTUConfig(ratio=s.ratio, norm="shift_min", scale=s.scale, score_entries=max(4096, C))
        res = wtu_select(s.scores, s.counts, cfg=cfg)
        wtu = res.cycles * s.rows_total / R
        frac = float(res.scanned.sum()) / (R * C)
    return UnitCycles(float(hcu), wtu, frac)


def synth_sample(n_clusters: int, scope_clusters: int, new_tokens: int, rows_total: int, head_dim: int,
                 n_hp: int = 32, cluster_size: float = 32.0, seed: int = 0, max_rows: int = MAX_ROWS) -> DRESample:
    """A reproducible, realistic-shaped sample (see the module doc); at most ``max_rows`` query rows."""
    g = torch.Generator().manual_seed(seed)
    C, Cs, T = max(0, n_clusters), max(0, min(scope_clusters, n_clusters)), max(0, new_tokens)
    planes = to_bf16(torch.randn(head_dim, n_hp, generator=g))
    means = torch.randn(max(C, 1), head_dim, generator=g)
    nb = (n_hp + 7) // 8
    cand = lxe_hash_codes(means[C - Cs:C], planes) if Cs else torch.zeros(0, nb, dtype=torch.uint8)
    if T and Cs:
        pick = torch.randint(C - Cs, C, (T,), generator=g)
        keys = means[pick] + 0.35 * torch.randn(T, head_dim, generator=g)  # ~half join (Hamming < 7)
    else:
        keys = torch.randn(T, head_dim, generator=g)
    new = lxe_hash_codes(keys, planes) if T else torch.zeros(0, nb, dtype=torch.uint8)
    R = min(rows_total, max_rows)
    q = torch.randn(R, head_dim, generator=g)
    scores = lxe_scores(q, means[:C]) if C else torch.zeros(R, 0)
    hi = max(1, int(round(2 * cluster_size)) - 1)
    counts = torch.randint(1, hi + 1, (C,), generator=g)
    return DRESample(new, cand, scores, counts, rows_total, n_hp, scale=1.0 / math.sqrt(head_dim))


@lru_cache(maxsize=512)
def sampled_cycles(n_clusters: int, scope_clusters: int, new_tokens: int, rows_total: int, head_dim: int,
                   n_hp: int = 32, cluster_size: float = 32.0) -> UnitCycles:
    """:func:`unit_cycles` of :func:`synth_sample` (cached per shape)."""
    return unit_cycles(synth_sample(n_clusters, scope_clusters, new_tokens, rows_total, head_dim, n_hp, cluster_size))


def temporal_stream(kv: KVMU, n_tokens: int, tokens_per_frame: int, cluster_size: float, live: int,
                    seed: int = 0) -> dict[int, list[int]]:
    """Append ``n_tokens`` in frames of clusters that live over several frames (module doc) to a
    one-head ``kv``; returns each cluster's token ids."""
    rnd = random.Random(seed)
    T = max(1, tokens_per_frame)
    p = min(1.0, T / max(cluster_size, 1.0))
    active, nxt, members, tok, credit = list(range(live)), live, {}, 0, 0.0
    while tok < n_tokens:
        ids = [rnd.choice(active) for _ in range(min(T, n_tokens - tok))]
        kv.append(len(ids), torch.tensor([ids]))
        for i in ids:
            members.setdefault(i, []).append(tok)
            tok += 1
        credit += p  # a steady replacement schedule: the mean cluster size is cluster_size, not a draw
        if credit >= 1.0:
            credit -= 1.0
            active = active[1:] + [nxt]
            nxt += 1
    return members


@lru_cache(maxsize=512)
def kvmu_run_tokens(offloaded: int, device_tokens: int, ratio: float, cluster_size: float, tokens_per_frame: int,
                    chunk_frames: int, live: int) -> float | None:
    """Mean tokens per transfer of the bit-exact KVMU on a sampled stream of the step's shape (module
    doc): ``offloaded + device_tokens`` tokens (at most :data:`MAX_KVMU_TOKENS`, the device share kept),
    whole clusters selected up to ``ratio``. ``None`` when no selected token was offloaded."""
    n = min(offloaded + device_tokens, MAX_KVMU_TOKENS)
    dev = min(device_tokens, n)
    kv = KVMU(1, KVMUConfig(tiers=(Tier("device", dev), Tier("ssd", None, 4096)), layout="cluster",
                            offload_chunk=max(1, chunk_frames)))
    members = temporal_stream(kv, n, tokens_per_frame, cluster_size, live)
    moved = runs = 0
    for s in range(KVMU_SELECTIONS):
        order = list(members)
        random.Random(1000 + s).shuffle(order)
        sel: list[int] = []
        for c in order:
            if len(sel) >= ratio * n:
                break
            sel += members[c]
        _, summ = kv.transfer_list([torch.tensor(sorted(sel), dtype=torch.int64)])
        moved, runs = moved + summ["offloaded_tokens"], runs + summ["transfers"]
    return moved / runs if runs else None


__all__ = ["DRESample", "UnitCycles", "unit_cycles", "synth_sample", "sampled_cycles", "MAX_ROWS",
           "MAX_KVMU_TOKENS", "KVMU_SELECTIONS", "temporal_stream", "kvmu_run_tokens"]
