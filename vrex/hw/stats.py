"""Retrieval statistics that drive the simulator: the paper's ratios, or a trace from our engine.

A trace is the engine's telemetry, JSON lines of schema ``vrex.kv.step/1`` (``vrex/kv/telemetry.py``:
one record per frame step, text prefill or decoded token, with per-layer/per-head numbers, a
``summary`` of means, cumulative ``io`` counters of the tiered store and their per-step deltas
``moved``). :data:`FIELD_MAP` says which record field feeds which statistic (dotted paths, first
present wins); it is the one place to edit if the schema changes.

* ``frame_ratio`` = mean ``ratio`` over ``frame`` records; ``text_ratio`` = mean over ``text`` and
  ``decode`` records (the paper's "text stage"). The ratio is the policy's own choice
  (``policy_selected_ratio``: before the always-kept sink/recent tokens, which are on the device
  anyway), falling back to ``selected_ratio``.
* ``cluster_size``, ``scan_fraction``, ``hc_overhead``: means over the records reporting them.
* ``ref_kv``: mean past tokens of the records that gave a ratio (the KV size the ratios belong to).
* ``run_tokens`` (mean contiguous run per fetch): fetched bytes / fetch transfers (summed over the
  steps' ``moved`` deltas, host and disk), divided by the bytes of one token of one KV head, which
  is resident bytes / (cached tokens x layers x KV heads) of the last record giving all of them.
* ``growth_exponent``: least-squares slope of log(selected tokens) against log(past tokens) over the
  ``frame`` records (selected = ratio x past), when they number at least 5 and span at least a
  factor 4 *and* 500 tokens of KV; ``None`` otherwise (the constant ``resv_growth_exponent`` is
  used). A slope over a few hundred tokens measures the policy's warm-up, not its growth law (a
  6-frame trace gave 0.98). ``frame_past_range`` keeps the span either way, so callers can say why.

Scaling to another model (e.g. a SmolLM2 trace simulated as Llama-3-8B): every statistic is a ratio
or a count of tokens/clusters, so it is used as measured; bytes come from the simulated model's
shapes (head_dim, KV heads, layers). The ratios' KV size (``ref_kv``) stays the trace's, and the
growth law extends them to the simulated KV sizes.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

#: statistic -> dotted paths into a ``vrex.kv.step/1`` record (first present wins)
FIELD_MAP: dict[str, tuple[str, ...]] = {
    "stage": ("stage",),
    "ratio": ("summary.policy_selected_ratio", "summary.selected_ratio"),
    "n_past": ("layers.0.n_past",),
    "cluster_size": ("summary.mean_cluster_size",),
    "scan_fraction": ("summary.scan_fraction",),
    "hc_overhead": ("summary.hc_ratio",),
    "fetch_disk_bytes": ("moved.fetch_disk_bytes",),
    "fetch_disk_transfers": ("moved.fetch_disk_transfers",),
    "fetch_host_bytes": ("moved.fetch_host_bytes",),
    "fetch_host_transfers": ("moved.fetch_host_transfers",),
    "cached_tokens": ("cached_tokens",),
    "resident_device": ("resident.device",),
    "resident_host": ("resident.host",),
    "resident_disk": ("resident.disk",),
    "kv_heads": ("layers.0.selected",),  # a list per KV head: its length
    "layers": ("layers",),  # a list per layer: its length
}
STAGE_ALIASES = {"frame": "frame", "text": "text", "decode": "decode"}


@dataclass(frozen=True)
class RetrievalStats:
    """Per-stage retrieval ratios and ReSV's structural statistics.

    ``frame_ratio``/``text_ratio`` of ``None`` keep each method's own (paper) ratio; set, they
    override the ReSV methods' ratios (a trace measures our ReSV). ``ref_kv`` is the KV size the
    ratios were measured at (``None``: the paper's COIN length, ``ratio_ref_kv``). ``run_tokens``:
    measured mean contiguous run per fetch (``None``: the simulator's layout model).
    """

    frame_ratio: float | None = None
    text_ratio: float | None = None
    cluster_size: float = 32.0  # paper: clusters average 32 tokens
    scan_fraction: float = 0.16  # paper: early exit after 16% of a row
    hc_overhead: float = 0.0167  # paper: HC table = 1.67% of the full KV
    ref_kv: float | None = None
    run_tokens: float | None = None
    growth_exponent: float | None = None
    frame_past_range: tuple[float, float] | None = None  # (min, max) past tokens of the frame records
    source: str = "paper"


PAPER = RetrievalStats()


def get(rec: dict, stat: str) -> Any:
    """The first present field of ``FIELD_MAP[stat]`` in a record (``None`` if none)."""
    for path in FIELD_MAP[stat]:
        cur: Any = rec
        for part in path.split("."):
            if isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
                cur = cur[int(part)]
            elif isinstance(cur, dict) and part in cur:
                cur = cur[part]
            else:
                cur = None
                break
        if cur is not None:
            return cur
    return None


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _mean(v: list[float]) -> float | None:
    return sum(v) / len(v) if v else None


GAMMA_MIN_POINTS, GAMMA_MIN_SPAN, GAMMA_MIN_TOKENS = 5, 4.0, 500.0


def growth_exponent(points: list[tuple[float, float]], min_points: int = GAMMA_MIN_POINTS, min_span: float = GAMMA_MIN_SPAN,
                    min_tokens: float = GAMMA_MIN_TOKENS) -> float | None:
    """Slope of log(selected) on log(past) (see the module doc); ``None`` if the points are too few or
    span less than a factor ``min_span`` or ``min_tokens`` of past tokens."""
    pos = [(x, y) for x, y in points if x > 0 and y > 0]
    pts = [(math.log(x), math.log(y)) for x, y in pos]
    if (len(pts) < min_points or max(x for x, _ in pts) - min(x for x, _ in pts) < math.log(min_span)
            or max(x for x, _ in pos) - min(x for x, _ in pos) < min_tokens):
        return None
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def stats_from_records(records: Iterable[dict], base: RetrievalStats = PAPER) -> RetrievalStats:
    """Statistics from telemetry records (see the module doc for every rule)."""
    ratios: dict[str, list[float]] = {"frame": [], "text": []}
    n_past: list[float] = []
    frame_pts: list[tuple[float, float]] = []
    other: dict[str, list[float]] = {"cluster_size": [], "scan_fraction": [], "hc_overhead": []}
    fetched = transfers = 0.0
    head_token_bytes: float | None = None
    n = 0
    for rec in records:
        n += 1
        stage = STAGE_ALIASES.get(str(get(rec, "stage")))
        r, past = _num(get(rec, "ratio")), _num(get(rec, "n_past"))
        if stage and r is not None and past:
            ratios["frame" if stage == "frame" else "text"].append(r)
            n_past.append(past)
            if stage == "frame" and r > 0:
                frame_pts.append((past, r * past))
        for k in other:
            v = _num(get(rec, k))
            if v is not None:
                other[k].append(v)
        for tier in ("disk", "host"):
            fetched += _num(get(rec, f"fetch_{tier}_bytes")) or 0.0
            transfers += _num(get(rec, f"fetch_{tier}_transfers")) or 0.0
        res = [_num(get(rec, f"resident_{t}")) for t in ("device", "host", "disk")]
        tok, heads, layers = _num(get(rec, "cached_tokens")), get(rec, "kv_heads"), get(rec, "layers")
        if tok and isinstance(heads, list) and heads and isinstance(layers, list) and layers and any(res):
            head_token_bytes = sum(x or 0.0 for x in res) / (tok * len(layers) * len(heads))
    if n == 0:
        raise ValueError("no telemetry records")
    run = fetched / transfers / head_token_bytes if transfers and head_token_bytes else None
    gamma = growth_exponent(frame_pts)
    span = (min(x for x, _ in frame_pts), max(x for x, _ in frame_pts)) if frame_pts else None
    return replace(
        base,
        frame_ratio=_mean(ratios["frame"]) if ratios["frame"] else base.frame_ratio,
        text_ratio=_mean(ratios["text"]) if ratios["text"] else base.text_ratio,
        cluster_size=_mean(other["cluster_size"]) or base.cluster_size,
        scan_fraction=_mean(other["scan_fraction"]) or base.scan_fraction,
        hc_overhead=_mean(other["hc_overhead"]) or base.hc_overhead,
        ref_kv=_mean(n_past) or base.ref_kv,
        run_tokens=run or base.run_tokens,
        growth_exponent=gamma if gamma is not None else base.growth_exponent,
        frame_past_range=span,
        source="trace",
    )


def load_trace(path: str | Path, base: RetrievalStats = PAPER) -> RetrievalStats:
    """Statistics from a JSONL telemetry file, gzipped if its name ends in ``.gz`` (blank lines are
    skipped)."""
    recs = []
    p = Path(path)
    text = gzip.decompress(p.read_bytes()).decode() if p.suffix == ".gz" else p.read_text()
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
    if not recs:
        raise ValueError(f"{path}: no telemetry records")
    return stats_from_records(recs, base)


__all__ = ["FIELD_MAP", "RetrievalStats", "PAPER", "get", "growth_exponent", "stats_from_records", "load_trace",
           "GAMMA_MIN_POINTS", "GAMMA_MIN_SPAN", "GAMMA_MIN_TOKENS"]
