"""ReSV step A.2: Hamming clustering of one frame's hash codes (spatial + temporal at once).

Pure tensor functions: one call clusters the ``T`` tokens of one new frame (for ``H`` KV heads at
once) against ``C`` *candidate* cluster codes (the in-scope clusters of the HC table) **and**
against the frame's own earlier tokens. The stateful table that owns cluster ids, member lists,
mean keys and codes is :class:`vrex.resv.table.HCTable`; the bit-exact hardware model (HCU)
reproduces :func:`cluster_frame_ref`.

Definition (per KV head; ``d(a, b)`` = Hamming distance, see :mod:`vrex.resv.hashing`)
-------------------------------------------------------------------------------------
Tokens ``t = 0 .. T-1`` of the frame are visited in arrival order. A candidate is *eligible* for
``t`` when ``d < threshold`` (``inclusive=False``, the paper's "<", default) or
``d <= threshold`` (``inclusive=True``). The **candidate order** for ``t`` is: the valid
existing clusters in increasing candidate index, then the frame's own earlier candidates in
increasing position:

* ``intra="tokens"`` (default; the HCU's "current hash-bit memory" holds the frame's token
  codes): every earlier token ``s < t`` of the frame is a candidate; matching ``s`` means
  joining the cluster ``s`` belongs to.
* ``intra="leaders"``: only earlier tokens that *opened* a new cluster (leaders) are candidates,
  i.e. the codes of the clusters created in this frame (their leader code).

Assignment rule ([U] unstated in the paper):

* ``rule="nearest"`` (default): the eligible candidate with the smallest distance; ties go to
  the earliest candidate in candidate order (so an existing cluster beats a same-distance
  intra-frame token).
* ``rule="first"``: the first eligible candidate in candidate order.

If no candidate is eligible, ``t`` becomes a *leader* and opens a new cluster.

Candidate codes are frozen for the whole frame: code updates (leader / majority / mean-hash,
see ``HCTable``) are applied after the frame is assigned, as a hardware HCU writes the table back.

Output encoding: ``assign[h, t] < C`` is a candidate index; ``assign[h, t] >= C`` means "the new
cluster whose leader is frame token ``assign[h, t] - C``" (a leader points at itself).

Comparisons (the HCU's work, for telemetry and the hardware model): for ``rule="nearest"``
token ``t`` compares against every candidate in its list (``C_valid + t`` with intra tokens,
``C_valid + leaders before t`` with intra leaders); for ``rule="first"`` it stops at the first
eligible candidate (its 1-based position in candidate order), or scans the whole list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .hashing import hamming, hamming_ref

AssignRule = Literal["nearest", "first"]
IntraMode = Literal["tokens", "leaders"]

_BIG = 1 << 30


@dataclass
class FrameAssignment:
    """Result of :func:`cluster_frame` for ``H`` heads and ``T`` tokens (``C`` candidates)."""

    assign: torch.Tensor  # int64 [H, T]; < C: candidate index; >= C: C + leader position
    is_leader: torch.Tensor  # bool [H, T]
    comparisons: torch.Tensor  # int64 [H]: Hamming comparisons made (see module doc)
    num_candidates: int  # C

    @property
    def num_new(self) -> torch.Tensor:
        """New clusters opened per head, ``int64 [H]``."""
        return self.is_leader.sum(-1)


def _eligible(d: torch.Tensor, threshold: int, inclusive: bool) -> torch.Tensor:
    return d <= threshold if inclusive else d < threshold


def cluster_frame(
    new_codes: torch.Tensor,
    cand_codes: torch.Tensor,
    cand_valid: torch.Tensor | None = None,
    *,
    threshold: int = 7,
    inclusive: bool = False,
    rule: AssignRule = "nearest",
    intra: IntraMode = "tokens",
) -> FrameAssignment:
    """Cluster one frame's codes ``uint8 [H, T, B]`` against candidates ``uint8 [H, C, B]``.

    ``cand_valid`` (``bool [H, C]``) masks padded candidate slots (heads may have different
    numbers of in-scope clusters). Vectorised over heads and tokens; with ``intra="leaders"``
    a loop over the ``T`` frame tokens remains (leader status is sequential).
    """
    if rule not in ("nearest", "first"):
        raise ValueError(f"rule must be 'nearest' or 'first', got {rule!r}")
    if intra not in ("tokens", "leaders"):
        raise ValueError(f"intra must be 'tokens' or 'leaders', got {intra!r}")
    H, T, _ = new_codes.shape
    C = cand_codes.shape[1]
    if cand_valid is None:
        cand_valid = torch.ones(H, C, dtype=torch.bool)
    n_valid = cand_valid.sum(-1)  # [H]
    ar = torch.arange(T)

    # existing candidates: best per token (vectorised over all tokens)
    if C > 0:
        d_e = hamming(new_codes, cand_codes)  # [H, T, C]
        el_e = _eligible(d_e, threshold, inclusive) & cand_valid.unsqueeze(1)
        any_e = el_e.any(-1)  # [H, T]
        if rule == "nearest":
            de_m = torch.where(el_e, d_e, torch.full_like(d_e, _BIG))
            best_e_d, best_e = de_m.min(-1)  # first minimum -> lowest index
        else:
            best_e = el_e.to(torch.int8).argmax(-1)  # first True
            best_e_d = torch.zeros_like(best_e)
            # rank of the first eligible among valid candidates (1-based) for the comparison count
            first_rank = torch.cumsum(cand_valid.to(torch.int64), -1).gather(-1, best_e)  # [H, T]
    else:
        any_e = torch.zeros(H, T, dtype=torch.bool)
        best_e = torch.zeros(H, T, dtype=torch.int64)
        best_e_d = torch.full((H, T), _BIG, dtype=torch.int64)
        first_rank = torch.zeros(H, T, dtype=torch.int64)

    d_f = hamming(new_codes, new_codes)  # [H, T, T]; [h, t, s]
    earlier = ar.unsqueeze(1) > ar.unsqueeze(0)  # [t, s]: s < t
    el_f = _eligible(d_f, threshold, inclusive) & earlier

    if intra == "tokens":
        if rule == "nearest":
            df_m = torch.where(el_f, d_f, torch.full_like(d_f, _BIG))
            best_f_d, best_f = df_m.min(-1)
            use_e = any_e & (best_e_d <= best_f_d)
            comparisons = (n_valid.unsqueeze(1) + ar.unsqueeze(0)).sum(-1)
        else:
            any_f = el_f.any(-1)
            best_f = el_f.to(torch.int8).argmax(-1)
            best_f_d = torch.where(any_f, 0, _BIG)
            use_e = any_e
            per_tok = torch.where(
                any_e, first_rank, torch.where(any_f, n_valid.unsqueeze(1) + best_f + 1, n_valid.unsqueeze(1) + ar)
            )
            comparisons = per_tok.sum(-1)
        use_f = ~use_e & (best_f_d < _BIG)
        is_leader = ~use_e & ~use_f
        # pointer into the frame: self for leaders, the matched earlier token otherwise
        ptr = torch.where(use_f, best_f, ar.expand(H, T))
        # pointer doubling: every chain ends at a leader or at a token that matched an existing cluster
        for _ in range(max(1, (T - 1).bit_length())):
            ptr = ptr.gather(-1, ptr)
        root_uses_e = use_e.gather(-1, ptr)
        root_best_e = best_e.gather(-1, ptr)
        assign = torch.where(root_uses_e, root_best_e, C + ptr)
        return FrameAssignment(assign, is_leader, comparisons, C)

    # intra == "leaders": sequential leader discovery
    assign = torch.empty(H, T, dtype=torch.int64)
    is_leader = torch.zeros(H, T, dtype=torch.bool)
    comparisons = torch.zeros(H, dtype=torch.int64)
    for t in range(T):
        el = el_f[:, t, :t] & is_leader[:, :t]  # [H, t]
        n_lead = is_leader[:, :t].sum(-1)
        if rule == "nearest":
            dm = torch.where(el, d_f[:, t, :t], torch.full_like(d_f[:, t, :t], _BIG))
            if t > 0:
                bfd, bf = dm.min(-1)
            else:
                bfd = torch.full((H,), _BIG, dtype=torch.int64)
                bf = torch.zeros(H, dtype=torch.int64)
            ue = any_e[:, t] & (best_e_d[:, t] <= bfd)
            uf = ~ue & (bfd < _BIG)
            comparisons += n_valid + n_lead
        else:
            af = el.any(-1) if t > 0 else torch.zeros(H, dtype=torch.bool)
            bf = el.to(torch.int8).argmax(-1) if t > 0 else torch.zeros(H, dtype=torch.int64)
            ue = any_e[:, t]
            uf = ~ue & af
            lead_rank = torch.cumsum(is_leader[:, :t].to(torch.int64), -1)
            rank_f = lead_rank.gather(-1, bf.unsqueeze(-1)).squeeze(-1) if t > 0 else torch.zeros(H, dtype=torch.int64)
            comparisons += torch.where(ue, first_rank[:, t], torch.where(uf, n_valid + rank_f, n_valid + n_lead))
        lead = ~ue & ~uf
        is_leader[:, t] = lead
        a_f = assign[:, :t].gather(-1, bf.unsqueeze(-1)).squeeze(-1) if t > 0 else torch.zeros(H, dtype=torch.int64)
        assign[:, t] = torch.where(ue, best_e[:, t], torch.where(uf, a_f, torch.full((H,), C + t, dtype=torch.int64)))
    return FrameAssignment(assign, is_leader, comparisons, C)


def cluster_frame_ref(
    new_codes: list[bytes],
    cand_codes: list[bytes | None],
    *,
    threshold: int = 7,
    inclusive: bool = False,
    rule: AssignRule = "nearest",
    intra: IntraMode = "tokens",
) -> tuple[list[int], list[bool], int]:
    """Reference (obvious loops) for ONE head: returns ``(assign, is_leader, comparisons)``.

    ``cand_codes[j] is None`` marks an invalid (padded) candidate slot.
    """
    C = len(cand_codes)
    assign: list[int] = []
    leader: list[bool] = []
    comparisons = 0
    for t, code in enumerate(new_codes):
        # candidate list in order: (distance, target) ; target = candidate idx or C + leader pos
        cands: list[tuple[int, int]] = []
        for j, cc in enumerate(cand_codes):
            if cc is not None:
                cands.append((hamming_ref(code, cc), j))
        for s in range(t):
            if intra == "tokens" or leader[s]:
                cands.append((hamming_ref(code, new_codes[s]), assign[s]))
        chosen = None
        if rule == "nearest":
            comparisons += len(cands)
            best = None
            for d, target in cands:
                ok = d <= threshold if inclusive else d < threshold
                if ok and (best is None or d < best[0]):
                    best = (d, target)
            chosen = None if best is None else best[1]
        else:
            for k, (d, target) in enumerate(cands):
                ok = d <= threshold if inclusive else d < threshold
                if ok:
                    chosen = target
                    comparisons += k + 1
                    break
            if chosen is None:
                comparisons += len(cands)
        if chosen is None:
            assign.append(C + t)
            leader.append(True)
        else:
            assign.append(chosen)
            leader.append(False)
    return assign, leader, comparisons


def new_cluster_ids(fa: FrameAssignment, cand_ids: torch.Tensor, n_clusters: torch.Tensor) -> torch.Tensor:
    """Map a :class:`FrameAssignment` to table cluster ids ``int64 [H, T]``.

    ``cand_ids [H, C]`` gives the table id of each candidate slot; ``n_clusters [H]`` is the number
    of clusters per head before the frame. New clusters get ids ``n_clusters[h], n_clusters[h]+1, ...``
    in leader-position order.
    """
    C = fa.num_candidates
    H, T = fa.assign.shape
    rank = torch.cumsum(fa.is_leader.to(torch.int64), -1) - 1  # [H, T] leader rank
    is_new = fa.assign >= C
    lead_pos = (fa.assign - C).clamp(min=0)
    new_id = n_clusters.unsqueeze(1) + rank.gather(-1, lead_pos)
    if C > 0:
        old_id = cand_ids.gather(-1, fa.assign.clamp(max=C - 1))
    else:
        old_id = torch.zeros(H, T, dtype=torch.int64)
    return torch.where(is_new, new_id, old_id)


def majority_codes(bit_counts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bitwise majority vote: bit ``j`` = 1 iff ``2 * ones_j > count`` (tie -> 0). Returns ``bool [..., n_hp]``."""
    return 2 * bit_counts > counts.unsqueeze(-1)


__all__ = [
    "AssignRule",
    "IntraMode",
    "FrameAssignment",
    "cluster_frame",
    "cluster_frame_ref",
    "new_cluster_ids",
    "majority_codes",
]
