"""``resv``: ReSV dynamic KV retrieval (hash-bit clustering + WiCSum thresholding).

Paper: "V-Rex: ... Dynamic KV Retrieval" (arXiv 2512.12284, HPCA 2026), Sec. IV (ReSV).
Training-free; used in frame prefill and in text prefill/decoding.

``on_append`` (per layer, every step): hash the step's post-RoPE keys on ``n_hyperplanes`` random
hyperplanes, Hamming-cluster them against the in-scope clusters and the step's own tokens, and
update the layer's HC table (:mod:`vrex.resv`). ``select``: score every cluster's mean key against
every query row, normalise, run WiCSum per row with the stage's ratio, union the clusters over the
rows of the KV head (all query tokens of all query heads sharing it: GQA), map them to tokens.

Parameters (paper defaults first; [U] = unstated in the paper, documented choice):

* ``n_hyperplanes`` 32, ``hamming_threshold`` 7, ``inclusive`` False ("join if distance < Th").
* ``ratio`` 0.3 (WiCSum ``Th_r``), ``ratio_text`` / ``ratio_decode`` (None = ``ratio``) [U].
* ``seed`` 0 and ``hyperplane_sharing`` ``"per_head"`` | ``"per_layer"`` | ``"global"`` [U].
* ``assign_rule`` ``"nearest"`` | ``"first"`` [U]; ``intra`` ``"tokens"`` | ``"leaders"`` [U]
  (see :mod:`vrex.resv.clustering`).
* ``code_update`` ``"leader"`` | ``"majority"`` | ``"mean"`` [U]; ``scope_frames`` 32 (None = all)
  and ``max_candidates`` (None) [U] (see :mod:`vrex.resv.table`).
* ``score_norm`` ``"shift_min"`` | ``"softmax"`` | ``"relu"`` | ``"raw"`` and ``score_scale``
  (None = ``1/sqrt(head_dim)``) [U]; ``sort_by`` ``"score"`` | ``"weighted"`` [U]
  (see :mod:`vrex.resv.wicsum`). Default ``shift_min``: the paper's rule on raw scores
  (q . Key_cluster), made well defined for negative logits by subtracting the row minimum, so
  ``ratio`` keeps the paper's meaning (a share of the weighted score sum; on SmolLM2 at 2K-4K
  tokens ratio 0.3 reads ~40-45% of frame tokens at top-1 1.0 vs full). With ``softmax`` the
  ratio becomes a share of attention mass: 0.3 keeps only ~10% of tokens and loses fidelity
  (top-1 0.74), while ``softmax`` + ``ratio`` 0.95 + ``hamming_threshold`` 4 reads ~20% / 10%
  (frame / decode) at better fidelity than ReKV at 50% (``vrex bench kv``, README).
* ``selection_scope`` ``"head"`` (each KV head its own tokens) | ``"layer"`` (union over heads) [U].
* ``max_tokens`` None: vrex's addition, not the paper's. WiCSum reads a share of the past, so a step's
  reads grow with the stream; ``max_tokens`` caps them per KV head and step (the chosen clusters in
  descending order of their best raw score ``q . Kc`` over the head's rows, while their tokens fit:
  :func:`vrex.resv.wicsum.cap_clusters`). The sink and recent tokens the cache always keeps come on
  top. None: the paper's WiCSum alone.
* ``num_buckets`` 16: bucket count of the WTU scan metric (not the selection) [U].
* ``text_clustering`` ``"cluster"`` (text/decode steps are clustered like frames, without
  ticking the frame clock) | ``"singleton"`` (each text token its own cluster) [U].
* ``clustering`` True; False = the paper's "without clustering" ablation (``resv-noclust``):
  every token is its own cluster, WiCSum runs over tokens.
* ``frozen_means`` ``"bfloat16"`` | ``"float32"``: how the HC table keeps the mean keys of clusters
  that left the scope window (never touched again): in bfloat16, as the hardware stores them, at
  half the memory (default; vrex's choice, issue 18), or as float32 sums. See :mod:`vrex.resv.table`.
* ``regroup_tokens`` 384 (about the 32-frame clustering scope at 12 tokens per frame): vrex's choice,
  the paper's KV memory unit in software. Each block is written in its cluster order, but a cluster
  collects tokens over many frames, so reading it took a run per frame; every ``regroup_tokens``
  stored tokens the cache rewrites the blocks since the last regroup as one block in cluster order
  (``LayerKV.regroup``), so a cluster is one run per span. Same selection, same attention up to float
  summation order; None keeps per-frame blocks. Ignored without clustering.
* ``key_bytes`` 2: bytes per element assumed for the HC table's mean keys and the KV size in
  ``hc_ratio`` (bf16, as the hardware).

``Selection.stats`` keys (per KV head lists have ``num_kv_heads`` entries):
``n_past``; ``selected`` (tokens chosen per head); ``clusters`` (clusters with past members);
``clusters_selected``; ``mean_cluster_size`` (past tokens / clusters); ``rows`` (query rows per
head); ``scanned`` (sum over rows of clusters scanned before early exit, exact-sort definition);
``scanned_bucketed`` (same with ``num_buckets`` buckets; None without buckets);
``scan_fraction`` (scanned / (rows * clusters), with buckets if set); ``dot_products``
(rows * clusters: the Q.Kc work); ``comparisons`` (HCU Hamming comparisons of the layer's last
``on_append``); ``hc_bytes``, ``kv_bytes`` (K+V of the past tokens at ``key_bytes``) and
``hc_ratio`` = hc_bytes / kv_bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from vrex.kv.policy import KVPolicy, PackedSelection, Selection, Stage
from vrex.resv.hashing import make_hyperplanes
from vrex.resv.table import HCTable
from vrex.resv.wicsum import cap_clusters, normalize_scores, wicsum_select

from ._common import gqa_rows
from .spec import check, integer_at_least, number_in

#: score normalisations the fast path's ``wicsum_union_scores`` computes itself (its mode numbers)
_FUSED_NORM = {"shift_min": 0, "relu": 1, "raw": 2}
_CHUNK_ELEMENTS = 1 << 21  # scores per WiCSum batch (rows x clusters x heads); bounds memory only

_CHOICES = {
    "hyperplane_sharing": ("per_head", "per_layer", "global"),
    "assign_rule": ("nearest", "first"),
    "intra": ("tokens", "leaders"),
    "code_update": ("leader", "majority", "mean"),
    "score_norm": ("softmax", "shift_min", "relu", "raw"),
    "sort_by": ("score", "weighted"),
    "selection_scope": ("head", "layer"),
    "text_clustering": ("cluster", "singleton"),
    "frozen_means": ("bfloat16", "float32"),
}


@dataclass
class ReSVPolicy(KVPolicy):
    name: ClassVar[str] = "resv"
    offloads: ClassVar[bool] = True
    n_hyperplanes: int = 32
    hamming_threshold: int = 7
    inclusive: bool = False
    ratio: float = 0.3
    ratio_text: float | None = None
    ratio_decode: float | None = None
    seed: int = 0
    hyperplane_sharing: str = "per_head"
    assign_rule: str = "nearest"
    intra: str = "tokens"
    code_update: str = "leader"
    scope_frames: int | None = 32
    max_candidates: int | None = None
    score_norm: str = "shift_min"
    score_scale: float | None = None
    sort_by: str = "score"
    selection_scope: str = "head"
    num_buckets: int | None = 16
    text_clustering: str = "cluster"
    clustering: bool = True
    key_bytes: int = 2
    max_tokens: int | None = None
    frozen_means: str = "bfloat16"
    regroup_tokens: int | None = 384
    tables: list[HCTable] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        for k, allowed in _CHOICES.items():
            check(self.name, k, getattr(self, k), lambda v, a=allowed: v in a, "one of " + ", ".join(allowed))
        check(self.name, "ratio", self.ratio, number_in(0, 1), "a number in [0, 1]")
        for k in ("ratio_text", "ratio_decode"):
            check(self.name, k, getattr(self, k), number_in(0, 1, none_ok=True), "None (= ratio) or a number in [0, 1]")
        check(self.name, "n_hyperplanes", self.n_hyperplanes, integer_at_least(1), "an integer >= 1")
        check(self.name, "hamming_threshold", self.hamming_threshold,
              lambda v: integer_at_least(0)(v) and v <= self.n_hyperplanes, f"an integer in [0, n_hyperplanes={self.n_hyperplanes}]")
        check(self.name, "scope_frames", self.scope_frames, integer_at_least(0, none_ok=True), "None (every cluster) or an integer >= 0")
        check(self.name, "regroup_tokens", self.regroup_tokens, integer_at_least(2, none_ok=True), "None or an integer >= 2")
        for k in ("max_candidates", "num_buckets", "max_tokens"):
            check(self.name, k, getattr(self, k), integer_at_least(1, none_ok=True), "None or an integer >= 1")
        check(self.name, "score_scale", self.score_scale,
              lambda v: v is None or (number_in(0, math.inf, lo_open=True)(v) and v < math.inf),
              "None (1/sqrt(head_dim)) or a finite number > 0")
        check(self.name, "key_bytes", self.key_bytes, integer_at_least(1), "an integer >= 1")

    def setup(self, num_layers, num_kv_heads, num_q_heads, head_dim) -> None:
        super().setup(num_layers, num_kv_heads, num_q_heads, head_dim)
        planes = make_hyperplanes(num_layers, num_kv_heads, head_dim, self.n_hyperplanes,
                                  seed=self.seed, sharing=self.hyperplane_sharing)
        self.tables = [
            HCTable(num_kv_heads, head_dim, planes[i], threshold=self.hamming_threshold, inclusive=self.inclusive,
                    rule=self.assign_rule, intra=self.intra, code_update=self.code_update,
                    scope_frames=self.scope_frames, max_candidates=self.max_candidates, frozen_means=self.frozen_means)
            for i in range(num_layers)
        ]

    def on_append(self, layer, keys, start, frame_id) -> None:
        tab = self.tables[layer]
        keys = keys.detach().float().cpu()  # the HC table lives in host memory (as in the paper)
        if not self.clustering:
            tab.add_singletons(keys, start, hash=False)
        elif frame_id is None and self.text_clustering == "singleton":
            tab.add_singletons(keys, start)
        else:
            tab.add(keys, start, is_frame=frame_id is not None, fast=self.kernels == "fast")

    def on_positions_changed(self, layer, keys) -> None:
        self.tables[layer].rebuild(keys.detach().float().cpu(), fast=self.kernels == "fast")

    def _state(self) -> dict:
        return {"tables": [t.state_dict() for t in self.tables]}

    def _load_state(self, state: dict) -> None:
        for table, saved in zip(self.tables, state["tables"], strict=True):
            table.load_state_dict(saved)

    def block_order(self, layer: int, start: int, length: int) -> torch.Tensor:
        """Cluster-contiguous physical order ``[H_kv, T]`` of a just-appended block (for ``LayerKV.set_block_order``)."""
        return self.tables[layer].block_order(start, length)

    def regroup_span(self) -> int | None:
        """Stored tokens between two regroupings by cluster (``regroup_tokens``; None: never, as without
        clustering every token is its own cluster and arrival order is already cluster order)."""
        return self.regroup_tokens if self.clustering else None

    def stage_ratio(self, stage: Stage) -> float:
        if stage == "text" and self.ratio_text is not None:
            return self.ratio_text
        if stage == "decode" and self.ratio_decode is not None:
            return self.ratio_decode
        return self.ratio

    def _cluster_inputs(self, layer: int, queries: torch.Tensor, n_past: int):
        """Mean keys, validity and past member counts of the layer's clusters, and the GQA query rows."""
        tab = self.tables[layer]
        if n_past > tab.n_tokens:
            raise ValueError(f"layer {layer}: n_past={n_past} but only {tab.n_tokens} tokens were indexed")
        mean, valid = tab.mean_keys()
        counts = tab.counts()
        if n_past < tab.n_tokens:  # tokens of the current step already indexed: count past members only
            tail = tab.token_clusters(n_past, tab.n_tokens)
            counts = counts - torch.zeros_like(counts).scatter_add_(1, tail, torch.ones_like(tail))
            valid = counts > 0
        rows = gqa_rows(queries.detach().float().cpu(), self.num_kv_heads)  # [H, R, D]
        return tab, mean, valid, counts, rows

    def _scale(self) -> float:
        return self.score_scale if self.score_scale is not None else 1.0 / math.sqrt(self.head_dim)

    def _best_scores(self, valid: torch.Tensor) -> torch.Tensor | None:
        """With ``max_tokens``: the running maximum of each cluster's raw score over the rows (the cap's
        priority), to be filled chunk by chunk; None without a cap."""
        return None if self.max_tokens is None else torch.full(valid.shape, -math.inf)

    def _row_step(self, n_clusters: int) -> int:
        # rows are independent: scored in chunks so a long text prefill stays in bounded memory
        return max(1, _CHUNK_ELEMENTS // max(1, self.num_kv_heads * n_clusters))

    def select_packed(self, layer: int, queries: torch.Tensor, n_past: int, stage: Stage,
                      want_stats: bool = False) -> PackedSelection:
        """Fast path (``vrex.kv.fast``): the same selection as :meth:`select` (identical ids, tested),
        with WiCSum and the cluster -> token mapping in C++. Without ``want_stats`` only the cheap
        statistics are built; with it, ``scanned_bucketed`` is None (exact-sort scan counts only)."""
        if self.selection_scope != "head":
            return super().select_packed(layer, queries, n_past, stage, want_stats)
        from vrex.kv.fast import load

        ext = load()
        tab, mean, valid, counts, rows = self._cluster_inputs(layer, queries, n_past)
        H, R = rows.shape[0], rows.shape[1]
        step = self._row_step(mean.shape[1])
        chosen = torch.zeros_like(valid)
        scanned = torch.zeros(H, dtype=torch.int64)
        ratio, weighted = float(self.stage_ratio(stage)), self.sort_by == "weighted"
        fused_norm = _FUSED_NORM.get(self.score_norm)
        best = self._best_scores(valid)
        for r0 in range(0, R, step):
            scores = torch.bmm(rows[:, r0 : r0 + step], mean.transpose(1, 2))  # [H, r, C]
            if fused_norm is not None:  # the normalisation in C++ too (same float32 operations, same weights)
                part, taken = ext.wicsum_union_scores(scores, counts, valid, fused_norm, self._scale(), ratio, weighted)
            else:
                w = normalize_scores(scores, valid, mode=self.score_norm, scale=self._scale())
                part, taken = ext.wicsum_union(w, counts, valid, ratio, weighted)
            chosen |= part
            scanned += taken.sum(1)
            if best is not None:
                torch.maximum(best, scores.amax(1), out=best)
        if best is not None:
            chosen = cap_clusters(chosen, best, counts, self.max_tokens)
        ids, offs = tab.chosen_token_ids(chosen, n_past)
        stats = self._stats(tab, valid, chosen, n_past, R, (offs[1:] - offs[:-1]).tolist(), scanned, None) if want_stats else {}
        return PackedSelection(ids, offs, False, stats)

    def _stats(self, tab: HCTable, valid: torch.Tensor, chosen: torch.Tensor, n_past: int, rows: int,
               selected: list[int], scanned: torch.Tensor, scanned_bucketed: torch.Tensor | None) -> dict:
        """``Selection.stats`` (see the module docstring), for both selection paths."""
        n_cl = valid.sum(1)
        kv_bytes = 2 * n_past * self.num_kv_heads * self.head_dim * self.key_bytes
        hc_bytes = tab.nbytes(key_bytes=self.key_bytes)
        scan = scanned_bucketed if scanned_bucketed is not None else scanned
        return {
            "n_past": n_past, "selected": selected, "clusters": n_cl.tolist(),
            "clusters_selected": chosen.sum(1).tolist(),
            "mean_cluster_size": [n_past / c if c else 0.0 for c in n_cl.tolist()], "rows": rows,
            "scanned": scanned.tolist(),
            "scanned_bucketed": None if scanned_bucketed is None else scanned_bucketed.tolist(),
            "scan_fraction": (scan.double() / (n_cl * rows).clamp(min=1).double()).tolist(),
            "dot_products": (n_cl * rows).tolist(), "comparisons": tab.last_comparisons.tolist(),
            "hc_bytes": hc_bytes, "kv_bytes": kv_bytes, "hc_ratio": hc_bytes / kv_bytes if kv_bytes else 0.0,
        }

    def select(self, layer: int, queries: torch.Tensor, n_past: int, stage: Stage) -> Selection:
        H = self.num_kv_heads
        tab, mean, valid, counts, rows = self._cluster_inputs(layer, queries, n_past)
        R = rows.shape[1]
        scale = self._scale()
        ratio = self.stage_ratio(stage)
        step = self._row_step(mean.shape[1])
        chosen = torch.zeros_like(valid)
        scanned = torch.zeros(H, dtype=torch.int64)
        sb = torch.zeros(H, dtype=torch.int64) if self.num_buckets else None
        best = self._best_scores(valid)
        for r0 in range(0, R, step):
            scores = torch.bmm(rows[:, r0 : r0 + step], mean.transpose(1, 2))  # [H, r, C]
            w = normalize_scores(scores, valid, mode=self.score_norm, scale=scale)
            res = wicsum_select(w, counts, ratio, valid, sort_by=self.sort_by, num_buckets=self.num_buckets)
            chosen |= res.union()
            scanned += res.taken.sum(1)
            if sb is not None:
                sb += res.scanned_bucketed.sum(1)
            if best is not None:
                best = torch.maximum(best, scores.amax(1))
        chosen &= valid  # [H, C]
        if best is not None:
            chosen = cap_clusters(chosen, best, counts, self.max_tokens)
        mask = tab.token_mask(chosen, n_past)  # [H, n_past]
        if self.selection_scope == "layer":
            mask = mask.any(0, keepdim=True).expand(H, n_past)
        indices = [torch.nonzero(mask[h]).flatten() for h in range(H)]
        stats = self._stats(tab, valid, chosen, n_past, R, [int(i.numel()) for i in indices], scanned, sb)
        return Selection(indices, stats)
