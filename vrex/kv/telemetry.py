"""KV telemetry: one JSON record per model step (frame prefill, text prefill, decoded token).

The benchmark, the web page and the hardware simulator (``vrex.hw``) all read these records, one
JSON object per line (JSON Lines). Build them with :func:`step_to_json` from the cache's
``StepRecord`` (``vrex.kv.cache``) and the session's extras, or write them with
:class:`TelemetryWriter`, which also fills the per-step deltas (``moved``).

Schema ``vrex.kv.step/1``
-------------------------
Top level:

``schema``        ``"vrex.kv.step/1"``
``stage``         ``"frame"`` | ``"text"`` | ``"decode"``
``t``             stream time of the step in seconds (the session's clock; null if unknown)
``frame_id``      frame index for frame steps, else null
``n_new``         tokens the step appended (per layer)
``cached_tokens`` tokens in the cache after the step (if the session passes it)
``wall_s``        wall time of the step in seconds: the session's value if given, else the sum of
                  the layers' ``fetch_s + attend_s``
``layers``        list, one object per attention layer, in call order (below)
``summary``       means over layers and KV heads of the per-head numbers below (null when no
                  layer reports them): ``selected_ratio``, ``policy_selected_ratio``,
                  ``clusters``, ``mean_cluster_size``, ``scan_fraction``, ``hc_ratio``
``io``            cumulative store counters after the step (``KVStore.counters()``):
                  ``fetch_host_{bytes,transfers}`` (device<-host), ``fetch_disk_{bytes,transfers}``
                  (device<-disk), ``offload_device_host_*``, ``offload_host_disk_*``,
                  ``device_read_bytes``, ``gathers``
``moved``         the same counters as deltas over this step (null when the writer has no
                  previous record, e.g. :func:`step_to_json` called alone)
``resident``      ``{"device", "host", "disk"}`` live KV bytes per tier after the step

Per layer (``layers[i]``); lists are per KV head:

``layer``, ``n_past`` (past tokens before the step), ``selected`` (tokens read per head,
always-kept sink/recent tokens included), ``selected_ratio`` (= selected / n_past; 1.0 when
n_past = 0), ``fetch_s`` / ``attend_s`` (seconds), and the policy's ``Selection.stats``
under ``policy`` (kept as the policy wrote them). Policies share these keys:
``n_past``, ``selected`` (the policy's own choice, before always-kept tokens). ReSV adds
(see ``vrex.kv.policies.resv``): ``clusters``, ``clusters_selected``, ``mean_cluster_size``,
``rows``, ``scanned``, ``scanned_bucketed``, ``scan_fraction`` (early-exit scan fraction),
``dot_products``, ``comparisons``, ``hc_bytes``, ``kv_bytes``, ``hc_ratio`` (hash-table bytes
relative to KV bytes). InfiniGen adds ``dot_products``; ReKV adds ``blocks``, ``blocks_selected``.
A sliding-window layer (never asked to the policy; ``vrex.kv.cache``) reports ``window`` (tokens),
``dropped`` (tokens its store dropped for good, out of the window) and ``saved_bytes`` (their K/V).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

SCHEMA = "vrex.kv.step/1"
_IO_KEYS = (
    "fetch_host_bytes", "fetch_host_transfers", "fetch_disk_bytes", "fetch_disk_transfers",
    "offload_device_host_bytes", "offload_device_host_transfers",
    "offload_host_disk_bytes", "offload_host_disk_transfers", "device_read_bytes", "gathers",
)


def _plain(x: Any) -> Any:
    """JSON-safe copy: tensors to lists, non-finite floats to None."""
    if isinstance(x, torch.Tensor):
        return _plain(x.tolist())
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (int, str, bool)) or x is None:
        return x
    if hasattr(x, "item"):
        return _plain(x.item())
    return str(x)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class LayerRecord:
    """One attention layer's part of a step: what the cache read, typed.

    ``VrexCache`` appends one entry per layer to ``StepRecord.layers`` (a dict with these keys;
    ``vrex serve``'s timeline reads more keys from it); :meth:`of` reads either form, so the session,
    the telemetry records and the benchmarks share one parsing and one :meth:`selected_ratio`.
    """

    layer: int
    n_past: int  # past tokens before the step
    selected: list[int]  # tokens read per KV head, always-kept sink/recent tokens included
    stats: dict[str, Any] = field(default_factory=dict)  # the policy's Selection.stats (a sliding layer: its window)
    fetch_s: float | None = None
    attend_s: float | None = None

    @classmethod
    def of(cls, entry: "LayerRecord | Mapping[str, Any]") -> "LayerRecord":
        """The typed record of one ``StepRecord.layers`` entry. A policy that read everything reports
        one count for all heads (an int): it is repeated once per head the policy's statistics list
        (one head when they list none), so every layer's ratios are per KV head."""
        if isinstance(entry, LayerRecord):
            return entry
        n_past = int(entry.get("n_past", 0))
        stats = dict(entry.get("stats") or {})
        sel = entry.get("selected", n_past)
        if isinstance(sel, torch.Tensor):
            sel = sel.tolist()
        if not isinstance(sel, (list, tuple)):
            heads = stats.get("selected")
            n_heads = len(heads) if isinstance(heads, (list, tuple)) or (isinstance(heads, torch.Tensor) and heads.dim() == 1) else 0
            sel = [int(sel)] * (n_heads or 1)
        return cls(layer=int(entry.get("layer", -1)), n_past=n_past, selected=[int(s) for s in sel], stats=stats,
                   fetch_s=entry.get("fetch_s"), attend_s=entry.get("attend_s"))

    def selected_ratio(self) -> list[float]:
        """Fraction of the past each KV head read (1.0 with no past): the one computation behind the
        session's events, the telemetry records and the benchmarks."""
        return [s / self.n_past if self.n_past else 1.0 for s in self.selected]

    def to_json(self) -> dict[str, Any]:
        """The layer's object in a telemetry record (schema above)."""
        return {"layer": self.layer, "n_past": self.n_past, "selected": list(self.selected),
                "selected_ratio": self.selected_ratio(), "fetch_s": self.fetch_s, "attend_s": self.attend_s,
                "policy": _plain(self.stats)}


def step_layers(record: Any) -> list[LayerRecord]:
    """The typed per-layer records of a ``StepRecord`` (none for an object without ``layers``)."""
    return [LayerRecord.of(entry) for entry in getattr(record, "layers", None) or []]


def selection_summary(*records: Any) -> dict[str, Any]:
    """``{"selected_ratio": mean}`` over the steps' layers with a past and their KV heads (``{}`` when
    none has a past): the session's event statistic, equal to the telemetry summary's."""
    ratios = _past_ratios(ly for record in records for ly in step_layers(record))
    return {"selected_ratio": sum(ratios) / len(ratios)} if ratios else {}


def _past_ratios(layers: Iterable[LayerRecord]) -> list[float]:
    """Per-head selected ratios of the layers that had a past (a first step reads nothing to choose from)."""
    return [r for ly in layers if ly.n_past for r in ly.selected_ratio()]


def step_to_json(record: Any, extra: dict[str, Any] | None = None, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """One telemetry record (schema above) from a ``StepRecord`` and the session's extras.

    ``extra`` may hold ``t``, ``cached_tokens``, ``wall_s`` and the store counters
    (``KVStore.counters()``, flat, including ``resident_*_bytes``). ``previous`` is the previous
    record of the same stream (for ``moved``).
    """
    extra = dict(extra or {})
    typed = step_layers(record)
    layers = [ly.to_json() for ly in typed]
    per_head: dict[str, list[float]] = {k: [] for k in ("selected_ratio", "policy_selected_ratio", "clusters",
                                                         "mean_cluster_size", "scan_fraction")}
    per_head["selected_ratio"] = _past_ratios(typed)
    hc: list[float] = []
    for ly in layers:
        if ly["n_past"]:
            ps = ly["policy"].get("selected")
            if isinstance(ps, list):
                per_head["policy_selected_ratio"] += [s / ly["n_past"] for s in ps]
        for k in ("clusters", "mean_cluster_size", "scan_fraction"):
            v = ly["policy"].get(k)
            if isinstance(v, list):
                per_head[k] += [float(x) for x in v if x is not None]
        if isinstance(ly["policy"].get("hc_ratio"), (int, float)):
            hc.append(float(ly["policy"]["hc_ratio"]))
    summary = {k: _mean(v) for k, v in per_head.items()}
    summary["hc_ratio"] = _mean(hc)
    io = {k: int(extra[k]) for k in _IO_KEYS if k in extra}
    moved = None
    if previous is not None and previous.get("io") is not None:
        moved = {k: io[k] - int(previous["io"].get(k, 0)) for k in io}
    resident = {t: int(extra[f"resident_{t}_bytes"]) for t in ("device", "host", "disk") if f"resident_{t}_bytes" in extra}
    wall = extra.get("wall_s")
    if wall is None:
        wall = sum((ly["fetch_s"] or 0.0) + (ly["attend_s"] or 0.0) for ly in layers)
    return _plain({
        "schema": SCHEMA,
        "stage": getattr(record, "stage", None),
        "t": extra.get("t"),
        "frame_id": getattr(record, "frame_id", None),
        "n_new": getattr(record, "n_new", None),
        "cached_tokens": extra.get("cached_tokens"),
        "wall_s": wall,
        "layers": layers,
        "summary": summary,
        "io": io or None,
        "moved": moved,
        "resident": resident or None,
    })


class TelemetryWriter:
    """JSON Lines writer; call it as the session's ``trace`` sink: ``writer(record, extra)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w", encoding="utf-8")
        self.previous: dict[str, Any] | None = None

    def __call__(self, record: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        out = step_to_json(record, extra, self.previous)
        self.file.write(json.dumps(out) + "\n")
        self.file.flush()
        self.previous = out
        return out

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "TelemetryWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of a telemetry file, in order."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def stage_means(records: Iterable[dict[str, Any]], key: str = "selected_ratio") -> dict[str, float | None]:
    """Mean of ``summary[key]`` per stage (e.g. the paper's frame/text retrieval ratios)."""
    acc: dict[str, list[float]] = {}
    for r in records:
        v = (r.get("summary") or {}).get(key)
        if v is not None:
            acc.setdefault(r.get("stage") or "?", []).append(float(v))
    return {k: _mean(v) for k, v in acc.items()}


__all__ = ["SCHEMA", "LayerRecord", "step_layers", "selection_summary", "step_to_json", "TelemetryWriter", "read_jsonl", "stage_means"]
