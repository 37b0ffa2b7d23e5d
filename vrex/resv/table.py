"""The hash-cluster (HC) table of one layer, for all its KV heads (the only stateful ReSV piece).

Per KV head ``h`` and cluster ``c`` (ids ``0 .. n_clusters[h]-1``, in creation order; within a
frame new clusters are numbered in leader-position order) the table holds: the code
(``uint8 [B]``), the member count ``TC``, the sum of member keys (mean key = sum / TC, float32),
the leader token, the creation and last-touch clock, and for every token its cluster id (so the
member list of a cluster is ``where(token_cluster[h] == c)``). The token -> cluster map grows with
the stream and is kept as int32 in fixed pages (:class:`vrex.kv.index.PagedIndex`: half the bytes
of int64, never reallocated); ``token_cluster`` reads it as an int64 copy, ``token_clusters(a, b)``
reads a range.

The key sums (nine tenths of the table's bytes) are kept by :mod:`vrex.resv.keysums`: by default in
per-head pages, compacted to bfloat16 means once their clusters left the scope window
(``frozen_means="bfloat16"``; ``"float32"`` keeps every sum in one buffer).

Documented choices ([U] in the paper), all constructor knobs:

* ``code_update``: how a cluster's code follows its members. ``"leader"`` (default; the code
  stays the code of the token that opened the cluster, no extra state, what a write-once HCU
  does), ``"majority"`` (bitwise majority vote over all members' codes, tie -> 0, see
  :func:`vrex.resv.clustering.majority_codes`), ``"mean"`` (the hash of the cluster's mean key).
  Updates are applied after each frame's assignment (codes are frozen within a frame).
* ``scope_frames``: the cluster scope window ("clustering runs within the recent cache"). A
  cluster is a candidate for a new frame iff it was last touched (got a member) at most
  ``scope_frames`` frame-clock ticks ago (default 32; ``None`` = every cluster). The frame clock
  ticks once per frame append; text/decode appends do not tick it.
* ``max_candidates``: optional cap on the in-scope clusters per head (the HCU's 4 KB key-cache
  hash memory holds 1024 codes of 32 bits); the most recently touched are kept (ties: higher id).
* ``threshold`` / ``inclusive`` / ``rule`` / ``intra``: see :mod:`vrex.resv.clustering`.
* Text/decode tokens are clustered like a frame (``add(..., is_frame=False)``) or as singleton
  clusters (``add_singletons``); the policy chooses.

Hash-table bytes of the hardware model (:meth:`HCTable.nbytes`): per cluster ``code_bytes + D * key_bytes`` (mean key)
``+ 2 * id_bytes`` (cluster id, TC), plus ``id_bytes`` per member token id.
"""

from __future__ import annotations

from typing import Literal

import torch

from vrex.kv.index import PagedIndex

from .clustering import AssignRule, IntraMode, cluster_frame, majority_codes, new_cluster_ids
from .grow import grow
from .keysums import KEY_PAGE, FlatKeySums, KeySums, PagedKeySums
from .hashing import code_bytes, hash_bits, hash_codes, pack_bits, unpack_bits

CodeUpdate = Literal["leader", "majority", "mean"]
FrozenMeans = Literal["bfloat16", "float32"]

#: Growth factor of the small per-cluster buffers (codes, counts, clocks, leaders): 1.25 rather than
#: 2 so that their unused tail stays under a quarter (amortised O(1) appends either way).
_GROWTH = 1.25


class HCTable:
    """HC table of one layer (all KV heads). See the module docstring."""

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        planes: torch.Tensor,
        *,
        threshold: int = 7,
        inclusive: bool = False,
        rule: AssignRule = "nearest",
        intra: IntraMode = "tokens",
        code_update: CodeUpdate = "leader",
        scope_frames: int | None = 32,
        max_candidates: int | None = None,
        frozen_means: FrozenMeans = "bfloat16",
    ) -> None:
        if code_update not in ("leader", "majority", "mean"):
            raise ValueError(f"code_update must be 'leader', 'majority' or 'mean', got {code_update!r}")
        if frozen_means not in ("bfloat16", "float32"):
            raise ValueError(f"frozen_means must be 'bfloat16' or 'float32', got {frozen_means!r}")
        H, D = num_kv_heads, head_dim
        self.H, self.D = H, D
        self.planes = planes.to(torch.float32)  # [H, D, n_hp]
        self.n_hp = planes.shape[-1]
        self.B = code_bytes(self.n_hp)
        self.threshold, self.inclusive, self.rule, self.intra = threshold, inclusive, rule, intra
        self.code_update, self.scope_frames, self.max_candidates = code_update, scope_frames, max_candidates
        self.n_clusters = torch.zeros(H, dtype=torch.int64)
        self.codes = torch.zeros(H, 0, self.B, dtype=torch.uint8)
        self.key_sums: KeySums = PagedKeySums(H, D) if frozen_means == "bfloat16" else FlatKeySums(H, D)
        self.count = torch.zeros(H, 0, dtype=torch.int64)
        self.last = torch.zeros(H, 0, dtype=torch.int64)
        self.leader_tok = torch.zeros(H, 0, dtype=torch.int64)
        self.bit_count = torch.zeros(H, 0, self.n_hp, dtype=torch.int32)
        self.tc = PagedIndex(H, "ReSV's token -> cluster map")
        self.n_tokens = 0
        self.clock = 0
        self.last_comparisons = torch.zeros(H, dtype=torch.int64)
        self.active = torch.zeros(H, 0, dtype=torch.int64)  # active list (scope window), see candidates()
        self.active_ok = torch.zeros(H, 0, dtype=torch.bool)

    # ------------------------------------------------------------------ building
    def _ensure(self, n_clusters_max: int, n_tokens: int, n_clusters: torch.Tensor | None = None) -> None:
        """Room for ``n_clusters_max`` clusters in the per-cluster buffers and ``n_tokens`` tokens, and
        key sums for ``n_clusters[h]`` clusters of each head (None: as many as ``n_clusters_max`` in a
        flat store; a paged store's pages for the fused add are made by the kernel)."""
        self.codes = grow(self.codes, 1, n_clusters_max, factor=_GROWTH)
        self.count = grow(self.count, 1, n_clusters_max, factor=_GROWTH)
        self.last = grow(self.last, 1, n_clusters_max, factor=_GROWTH)
        self.leader_tok = grow(self.leader_tok, 1, n_clusters_max, factor=_GROWTH)
        if self.code_update == "majority":
            self.bit_count = grow(self.bit_count, 1, n_clusters_max, factor=_GROWTH)
        self.key_sums.ensure(self.n_clusters if n_clusters is None else n_clusters, n_clusters_max)
        self.tc.ensure(n_tokens)

    def _compact(self) -> None:
        """Tell the key store which clusters are out of scope (last touched more than ``scope_frames``
        frames ago: never candidates again; see :mod:`vrex.resv.keysums`), and narrow the full pages
        of the token -> cluster map (tokens before ``n_tokens`` keep their cluster; see
        :mod:`vrex.kv.index`)."""
        self.tc.compact(self.n_tokens)
        if self.scope_frames is not None:
            self.key_sums.compact(self.last, self.clock - self.scope_frames, self.count, self.n_clusters)

    def compacted_pages(self) -> int:
        """Key pages holding bfloat16 means (every cluster in them out of scope), over all heads."""
        return self.key_sums.compacted_pages()

    @property
    def token_cluster(self) -> torch.Tensor:
        """Cluster id of every indexed token, ``int64 [H, n_tokens]`` (a copy; see the module docstring)."""
        return self.tc.read(0, self.n_tokens)

    def token_clusters(self, a: int, b: int) -> torch.Tensor:
        """Cluster ids of tokens ``a .. b-1``, ``int64 [H, b - a]``."""
        return self.tc.read(a, b)

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """In-scope cluster ids ``int64 [H, A]`` (padded, ascending id) and validity ``bool [H, A]``.

        With a scope window the ids come from the *active list* (clusters touched within the window,
        kept up to date by every commit), so the cost is bounded by ``scope_frames x tokens/frame``
        rather than by the number of clusters ever created.
        """
        if self.scope_frames is None:
            nmax = int(self.n_clusters.max()) if self.H else 0
            ids = torch.arange(nmax).expand(self.H, nmax)
            ok = ids < self.n_clusters.unsqueeze(1)
        else:
            ids = self.active
            ok = self.active_ok & (self.clock - self.last.gather(1, ids) <= self.scope_frames)
        if self.max_candidates is not None and ids.shape[1] > 0:
            # keep the most recently touched (ties: higher id), then restore ascending-id order
            big = int(ids.max()) + 1
            prio = torch.where(ok, self.last.gather(1, ids) * (big + 1) + ids, torch.full_like(ids, -1))
            order = torch.argsort(prio, dim=1, descending=True, stable=True)
            A = min(int(ok.sum(1).max()), self.max_candidates)
            sel = ids.gather(1, order[:, :A])
            sel_ok = ok.gather(1, order[:, :A])
            key = torch.where(sel_ok, sel, torch.full_like(sel, big))
            key, _ = key.sort(dim=1)
            return key.clamp(max=big - 1), key < big
        A = int(ok.sum(1).max()) if ids.shape[1] else 0
        order = torch.argsort((~ok).to(torch.int8), dim=1, stable=True)[:, :A]
        return ids.gather(1, order), ok.gather(1, order)

    def _update_active(self, touched: torch.Tensor) -> None:
        """Merge the clusters touched by a commit into the active list; drop out-of-scope and duplicates."""
        H = self.H
        big = 1 << 62
        keep_old = self.active_ok & (self.clock - self.last.gather(1, self.active) <= self.scope_frames)
        comb = torch.cat([torch.where(keep_old, self.active, torch.full_like(self.active, big)), touched], 1)
        srt, _ = comb.sort(dim=1)
        dup = torch.zeros_like(srt, dtype=torch.bool)
        dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
        ok = ~dup & (srt < big)
        A = int(ok.sum(1).max()) if srt.shape[1] else 0
        order = torch.argsort((~ok).to(torch.int8), dim=1, stable=True)[:, :A]
        ids = srt.gather(1, order)
        self.active_ok = ok.gather(1, order)
        self.active = torch.where(self.active_ok, ids, torch.zeros_like(ids)).reshape(H, A)

    def add(self, keys: torch.Tensor, start: int, *, is_frame: bool = True, codes: torch.Tensor | None = None,
            fast: bool = False) -> torch.Tensor:
        """Cluster tokens ``start .. start+T-1`` (keys ``[H, T, D]``); returns their cluster ids ``[H, T]``.

        ``fast``: run the fused C++ ``hc_add`` (vrex.kv.fast) where it applies (the default table:
        intra "tokens", code update "leader", a scope window, no candidate cap; CPU keys, own hashing);
        it leaves the table exactly as this method's PyTorch path does (tests/resv/test_table_fast.py)."""
        if start != self.n_tokens:
            raise ValueError(f"HC table expects token {self.n_tokens} next, got start={start}")
        H, T, _ = keys.shape
        if is_frame:
            self.clock += 1
        k32 = keys.to(torch.float32)
        if fast and codes is None and self.fused_add_applies and k32.device.type == "cpu":
            return self._add_fused(k32.contiguous(), start)
        if codes is None:
            codes = hash_codes(k32, self.planes)
        cand_ids, cand_valid = self.candidates()
        cand_codes = self.codes.gather(1, cand_ids.unsqueeze(-1).expand(H, cand_ids.shape[1], self.B))
        fa = cluster_frame(
            codes, cand_codes, cand_valid,
            threshold=self.threshold, inclusive=self.inclusive, rule=self.rule, intra=self.intra,
        )
        self.last_comparisons = fa.comparisons
        ids = new_cluster_ids(fa, cand_ids, self.n_clusters)
        self._commit(k32, codes, ids, fa.is_leader, start)
        return ids

    @property
    def fused_add_applies(self) -> bool:
        """The table options the fused ``hc_add`` kernel implements."""
        return (self.intra == "tokens" and self.code_update == "leader" and self.scope_frames is not None
                and self.max_candidates is None)

    def _add_fused(self, k32: torch.Tensor, start: int) -> torch.Tensor:
        from vrex.kv.fast import load

        T = k32.shape[1]
        self._ensure(int(self.n_clusters.max()) + T if self.H else 0, start + T)  # room for T new clusters
        pages, shift = self.key_sums.kernel_pages()
        (ids, self.active, self.active_ok, self.last_comparisons), pages = load().hc_add(
            hash_bits(k32, self.planes), k32, self.active, self.active_ok, self.last, self.count, pages,
            shift, self.codes, self.leader_tok, self.tc.pages, self.tc.shift, self.n_clusters, start, self.clock,
            self.scope_frames, self.threshold, self.inclusive, self.rule == "first")
        self.key_sums.set_kernel_pages(pages)
        self.n_tokens = start + T
        self._compact()
        return ids

    def add_singletons(self, keys: torch.Tensor, start: int, *, hash: bool = True) -> torch.Tensor:
        """Every token opens its own cluster (no clustering; text tokens or the no-cluster ablation).

        ``hash=False`` skips hashing (codes stay zero), for the no-clustering ablation."""
        if start != self.n_tokens:
            raise ValueError(f"HC table expects token {self.n_tokens} next, got start={start}")
        H, T, _ = keys.shape
        k32 = keys.to(torch.float32)
        codes = hash_codes(k32, self.planes) if hash else torch.zeros(H, T, self.B, dtype=torch.uint8)
        ids = self.n_clusters.unsqueeze(1) + torch.arange(T)
        self.last_comparisons = torch.zeros(H, dtype=torch.int64)
        self._commit(k32, codes, ids, torch.ones(H, T, dtype=torch.bool), start)
        return ids

    def _commit(self, k32, codes, ids, is_leader, start) -> None:
        H, T, D = k32.shape
        n_new = is_leader.sum(1)
        self._ensure(int((self.n_clusters + n_new).max()), start + T, self.n_clusters + n_new)
        C = self.codes.shape[1]
        flat = (ids + torch.arange(H).unsqueeze(1) * C).reshape(-1)
        self.count.view(-1).index_add_(0, flat, torch.ones(H * T, dtype=torch.int64))
        self.key_sums.add(ids, k32)
        self.last.view(-1)[flat] = self.clock
        lead_flat = flat[is_leader.reshape(-1)]
        self.codes.view(-1, self.B)[lead_flat] = codes.reshape(-1, self.B)[is_leader.reshape(-1)]
        tok = (start + torch.arange(T)).expand(H, T)
        self.leader_tok.view(-1)[lead_flat] = tok[is_leader]
        if self.code_update == "majority":
            bits = unpack_bits(codes, self.n_hp).to(torch.int32)
            self.bit_count.view(-1, self.n_hp).index_add_(0, flat, bits.reshape(-1, self.n_hp))
            touched = torch.unique(flat)
            maj = majority_codes(self.bit_count.view(-1, self.n_hp)[touched], self.count.view(-1)[touched])
            self.codes.view(-1, self.B)[touched] = pack_bits(maj)
        elif self.code_update == "mean":
            touched = torch.unique(flat)
            head = touched // C
            mean = self.key_sums.sums_at(head, touched % C) / self.count.view(-1)[touched].unsqueeze(-1)
            proj = torch.einsum("nd,ndp->np", mean, self.planes[head])
            self.codes.view(-1, self.B)[touched] = pack_bits(proj > 0)
        self.n_clusters += n_new
        self.tc.write(start, ids)
        if self.scope_frames is not None:
            self._update_active(ids)
        self.n_tokens = start + T
        self._compact()

    def rebuild(self, keys: torch.Tensor, fast: bool = False) -> None:
        """Keys were re-rotated (``[H, N, D]``, N = n_tokens): keep memberships, recompute means and codes.
        ``fast``: the sums in C++ (``vrex.kv.fast`` ``cluster_sums``, the same additions in the same order)."""
        H, N, D = keys.shape
        if N != self.n_tokens:
            raise ValueError(f"rebuild expects {self.n_tokens} tokens, got {N}")
        k32 = keys.to(torch.float32)
        C = self.codes.shape[1]
        clusters = self.tc.read(0, N)
        # [H * N] rows of [H * C, .] tables: what index_add_ needs (the reference sums, majority codes)
        flat = None if fast and self.code_update != "majority" else (clusters + torch.arange(H).unsqueeze(1) * C).reshape(-1)
        if fast:
            from vrex.kv.fast import load

            sums = load().cluster_sums(k32.contiguous(), clusters, C)
        else:
            sums = torch.zeros(H, C, D, dtype=torch.float32)
            sums.view(-1, D).index_add_(0, flat, k32.reshape(-1, D))
        self.key_sums.set_sums(sums, self.count)
        del sums
        nmax = int(self.n_clusters.max()) if H else 0
        valid = torch.arange(nmax).expand(H, nmax) < self.n_clusters.unsqueeze(1)
        if self.code_update == "leader":
            # only the leaders' codes are kept: hash those keys, not all N (a cluster has many members)
            lt = self.leader_tok[:, :nmax].clamp(max=max(N - 1, 0))
            new = hash_codes(k32.gather(1, lt.unsqueeze(-1).expand(H, nmax, D)), self.planes)
        elif self.code_update == "majority":
            codes = hash_codes(k32, self.planes)  # [H, N, B]
            self.bit_count.zero_()
            bits = unpack_bits(codes, self.n_hp).to(torch.int32)
            self.bit_count.view(-1, self.n_hp).index_add_(0, flat, bits.reshape(-1, self.n_hp))
            new = pack_bits(majority_codes(self.bit_count[:, :nmax], self.count[:, :nmax]))
        else:
            mean = self.mean_keys()[0]
            new = hash_codes(mean, self.planes)
        cur = self.codes[:, :nmax]
        self.codes[:, :nmax] = torch.where(valid.unsqueeze(-1), new, cur)

    # ------------------------------------------------------------------ persistence
    _STATE = ("n_clusters", "codes", "count", "last", "leader_tok", "bit_count",
              "last_comparisons", "active", "active_ok")

    def state_dict(self) -> dict:
        """The table's contents (used rows only; capacity is not state) and its clocks; the hyperplanes
        and knobs are the constructor's (``load_state_dict`` checks the hyperplanes match).

        ``key_sum`` is float32 ``[H, Cmax, D]``: the sums, and in compacted pages (``key_pages_compacted``,
        bool ``[H, pages]``) their bfloat16 means, which float32 holds exactly."""
        nmax = int(self.n_clusters.max()) if self.H else 0
        out = {k: getattr(self, k).clone() for k in self._STATE}
        for k in ("codes", "count", "last", "leader_tok"):
            out[k] = out[k][:, :nmax]
        out["key_sum"], out["key_pages_compacted"] = self.key_sums.state(nmax)
        if self.code_update == "majority":
            out["bit_count"] = out["bit_count"][:, :nmax]
        out["token_cluster"] = self.token_cluster
        out.update(n_tokens=self.n_tokens, clock=self.clock, planes=self.planes.clone())
        return out

    def load_state_dict(self, state: dict) -> None:
        if not torch.equal(state["planes"], self.planes):
            raise ValueError("HC table state was hashed with other hyperplanes (another seed or sharing)")
        for k in self._STATE:
            setattr(self, k, state[k].clone())
        # absent: a state saved before key pages (float32 sums throughout; compacted at the next add)
        compacted = state.get("key_pages_compacted", torch.zeros(self.H, 0, dtype=torch.bool))
        self.key_sums.load(state["key_sum"], compacted, self.n_clusters)
        self.tc = PagedIndex(self.H, self.tc.name)
        self.tc.write(0, state["token_cluster"])  # saved as int64 (or int32): checked on the way in
        self.n_tokens, self.clock = int(state["n_tokens"]), int(state["clock"])

    # ------------------------------------------------------------------ reading
    def mean_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean keys ``float32 [H, Cmax, D]`` and validity ``bool [H, Cmax]`` (Cmax = max clusters over heads)."""
        nmax = int(self.n_clusters.max()) if self.H else 0
        cnt = self.count[:, :nmax]
        valid = cnt > 0
        return self.key_sums.means(self.count, self.n_clusters, nmax), valid

    def counts(self) -> torch.Tensor:
        """Token counts ``int64 [H, Cmax]`` (0 for padding)."""
        nmax = int(self.n_clusters.max()) if self.H else 0
        return self.count[:, :nmax]

    def token_mask(self, selected: torch.Tensor, n_past: int) -> torch.Tensor:
        """Tokens ``< n_past`` whose cluster is selected: ``bool [H, n_past]`` from ``selected bool [H, Cmax]``."""
        tc = self.tc.read(0, n_past)
        if selected.shape[1] == 0:
            return torch.zeros(self.H, n_past, dtype=torch.bool)
        return selected.gather(1, tc.clamp(max=selected.shape[1] - 1)) & (tc < selected.shape[1])

    def members(self, head: int, cluster: int) -> torch.Tensor:
        """Member token ids of one cluster (sorted)."""
        return torch.nonzero(self.token_cluster[head] == cluster).flatten()

    def block_order(self, start: int, length: int) -> torch.Tensor:
        """Cluster-contiguous physical order ``int64 [H, T]`` of tokens ``start .. start+T-1``.

        ``order[h, p]`` is the block-relative token placed at physical slot ``p``: tokens grouped by
        cluster id (ascending), arrival order inside a cluster.
        """
        ids = self.tc.read(start, start + length)
        key = ids * length + torch.arange(length)
        return torch.argsort(key, dim=1, stable=True)

    def chosen_token_ids(self, chosen: torch.Tensor, n_past: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast path (C++): ascending ids ``< n_past`` of the tokens whose cluster is ``chosen`` (``bool [H, C]``),
        packed per head: ``(ids int64 [total], offs int64 [H + 1])``."""
        from vrex.kv.fast import load

        return load().cluster_token_ids(chosen, self.tc.pages, self.tc.shift, n_past)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this table holds in memory now (allocated, not the hardware model's ``nbytes``):
        ``tokens``, the token -> cluster map; ``clusters``, the per-cluster buffers (codes, key sums,
        counts, clocks, leaders, active list)."""
        per_cluster = ("codes", "count", "last", "leader_tok", "bit_count", "active", "active_ok")
        return {"tokens": self.tc.nbytes(),
                "clusters": sum(getattr(self, k).untyped_storage().nbytes() for k in per_cluster)
                + self.key_sums.nbytes()}

    def nbytes(self, key_bytes: int = 2, id_bytes: int = 4) -> int:
        """HC table size in bytes (see module docstring)."""
        per_cluster = self.B + self.D * key_bytes + 2 * id_bytes
        return int(self.n_clusters.sum()) * per_cluster + self.n_tokens * self.H * id_bytes


__all__ = ["KEY_PAGE", "CodeUpdate", "FrozenMeans", "HCTable"]
