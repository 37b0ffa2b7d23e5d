"""ReSV policy against a slow reference built from obvious loops (Quest-style equivalence)."""

import math

import pytest
import torch

from vrex.kv.policies import make_policy
from vrex.resv.wicsum import cap_clusters, normalize_scores, wicsum_ref

L, HKV, HQ, D, T = 1, 2, 4, 16, 5


def stream(pol, n_frames=8, seed=0, noise=0.2):
    pol.setup(L, HKV, HQ, D)
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(HKV, T, D, generator=g)
    keys = []
    for f in range(n_frames):
        base = base + noise * torch.randn(HKV, T, D, generator=g)
        pol.on_append(0, base.clone(), f * T, f)
        keys.append(base.clone())
    return torch.cat(keys, 1)


def reference_select(pol, keys, q, n_past, ratio):
    """Per head: clusters from the table's memberships, means by loops, WiCSum row by row, union."""
    tab = pol.tables[0]
    G = HQ // HKV
    out = []
    for h in range(HKV):
        members = {}
        for i in range(n_past):
            members.setdefault(int(tab.token_cluster[h, i]), []).append(i)
        C = int(tab.n_clusters[h])
        means = torch.zeros(C, D)
        counts = torch.zeros(C, dtype=torch.int64)
        valid = torch.zeros(C, dtype=torch.bool)
        for c, m in members.items():
            means[c] = keys[h, m].sum(0) / len(m)
            counts[c] = len(m)
            valid[c] = True
        chosen = set()
        rows = q[h * G : (h + 1) * G].reshape(-1, D)
        scores = rows @ means.T
        w = normalize_scores(scores, valid, mode=pol.score_norm, scale=1 / math.sqrt(D))
        for r in range(rows.shape[0]):
            taken, _, _ = wicsum_ref(w[r].tolist(), counts.tolist(), ratio, valid.tolist(), sort_by=pol.sort_by)
            chosen |= set(taken)
        out.append(sorted(i for c in chosen for i in members.get(c, [])))
    return out


@pytest.mark.parametrize("name", ["resv", "resv-noclust"])
@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.8])
@pytest.mark.parametrize("kw", [{}, {"score_norm": "shift_min", "sort_by": "weighted"}, {"code_update": "majority", "assign_rule": "first"}])
def test_policy_matches_reference(name, ratio, kw):
    pol = make_policy(name, ratio=ratio, **kw)
    keys = stream(pol)
    n = keys.shape[1]
    q = torch.randn(HQ, 3, D, generator=torch.Generator().manual_seed(5))
    sel = pol.select(0, q, n, "frame")
    ref = reference_select(pol, keys, q, n, ratio)
    # means may differ in the last bit (index_add vs sum): compare on inputs far from ties
    got = [s.tolist() for s in sel.indices]
    assert got == ref


def test_noclust_is_token_level():
    pol = make_policy("resv-noclust")
    keys = stream(pol)
    assert torch.equal(pol.tables[0].counts(), torch.ones(HKV, keys.shape[1], dtype=torch.int64))


def test_stage_ratios_and_layer_scope():
    pol = make_policy("resv", ratio=0.3, ratio_text=0.9, ratio_decode=0.01)
    keys = stream(pol)
    n = keys.shape[1]
    q = torch.randn(HQ, 2, D, generator=torch.Generator().manual_seed(1))
    s_frame = sum(i.numel() for i in pol.select(0, q, n, "frame").indices)
    s_text = sum(i.numel() for i in pol.select(0, q, n, "text").indices)
    s_dec = sum(i.numel() for i in pol.select(0, q, n, "decode").indices)
    assert s_dec <= s_frame <= s_text
    lay = make_policy("resv", selection_scope="layer")
    stream(lay)
    per_head = make_policy("resv")
    stream(per_head)
    a = lay.select(0, q, n, "frame").indices
    b = per_head.select(0, q, n, "frame").indices
    union = torch.unique(torch.cat(b))
    assert all(torch.equal(x, union) for x in a)


def test_stats_are_consistent():
    pol = make_policy("resv")
    keys = stream(pol)
    n = keys.shape[1]
    q = torch.randn(HQ, 3, D, generator=torch.Generator().manual_seed(2))
    st = pol.select(0, q, n, "frame").stats
    assert st["n_past"] == n and st["rows"] == 3 * HQ // HKV
    for h in range(HKV):
        assert st["clusters"][h] == int(pol.tables[0].n_clusters[h])
        assert 0 < st["clusters_selected"][h] <= st["clusters"][h]
        assert abs(st["mean_cluster_size"][h] * st["clusters"][h] - n) < 1e-9
        assert 0.0 < st["scan_fraction"][h] <= 1.0
        assert st["dot_products"][h] == st["rows"] * st["clusters"][h]
        assert st["scanned"][h] <= st["scanned_bucketed"][h]
    assert st["hc_bytes"] == pol.tables[0].nbytes(key_bytes=2)
    assert st["kv_bytes"] == 2 * n * HKV * D * 2 and st["hc_ratio"] == st["hc_bytes"] / st["kv_bytes"]


def test_select_after_current_tokens_were_indexed():
    """The policy contract allows on_append before select: current tokens are excluded and TC counts only past members."""
    pol = make_policy("resv", ratio=1.0)
    keys = stream(pol)
    n_past = keys.shape[1] - T  # the last frame is "current"
    sel = pol.select(0, torch.randn(HQ, 2, D), n_past, "frame")
    assert all(torch.equal(i, torch.arange(n_past)) for i in sel.indices)
    assert sum(sel.stats["clusters"]) <= sum(int(c) for c in pol.tables[0].n_clusters)


def test_positions_changed_rebuilds_index():
    pol = make_policy("resv")
    keys = stream(pol)
    before = pol.tables[0].token_cluster.clone()
    rot = keys.flip(-1)
    pol.on_positions_changed(0, rot)
    assert torch.equal(pol.tables[0].token_cluster, before)
    mean, _ = pol.tables[0].mean_keys()
    m = pol.tables[0].members(0, 0)
    assert torch.allclose(mean[0, 0], rot[0, m].mean(0), atol=1e-5)


def test_block_order_for_store():
    pol = make_policy("resv")
    stream(pol)
    order = pol.block_order(0, 3 * T, T)
    assert order.shape == (HKV, T)
    assert all(sorted(o.tolist()) == list(range(T)) for o in order)


def test_bad_config_is_clear():
    with pytest.raises(ValueError, match="code_update"):
        make_policy("resv", code_update="vote")
    with pytest.raises(ValueError, match="ratio"):
        make_policy("resv", ratio=-1)


def test_row_chunking_does_not_change_results(monkeypatch):
    import vrex.kv.policies.resv as resv_mod

    pol = make_policy("resv")
    keys = stream(pol)
    n = keys.shape[1]
    q = torch.randn(HQ, 7, D, generator=torch.Generator().manual_seed(4))
    a = pol.select(0, q, n, "text")
    monkeypatch.setattr(resv_mod, "_CHUNK_ELEMENTS", 1)  # one row per batch
    b = pol.select(0, q, n, "text")
    assert [x.tolist() for x in a.indices] == [x.tolist() for x in b.indices]
    assert a.stats == b.stats


def test_seed_changes_hyperplanes_not_determinism():
    a, b, c = make_policy("resv", seed=0), make_policy("resv", seed=0), make_policy("resv", seed=1)
    for p in (a, b, c):
        stream(p)
    assert torch.equal(a.tables[0].planes, b.tables[0].planes)
    assert torch.equal(a.tables[0].token_cluster, b.tables[0].token_cluster)
    assert not torch.equal(a.tables[0].planes, c.tables[0].planes)


def test_cap_keeps_the_best_clusters_that_fit():
    chosen = torch.tensor([[True, True, False, True, True], [True, True, True, True, True]])
    priority = torch.tensor([[0.5, 2.0, 9.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    counts = torch.tensor([[4, 3, 50, 2, 2], [1, 2, 3, 4, 5]])
    got = cap_clusters(chosen, priority, counts, 7)
    # head 0: by priority 1 (3 tokens), then 3 and 4 (ties: lower index first; 5, 7): cluster 0 no longer fits;
    # the unchosen cluster 2 never counts. Head 1, all tied: index order while the sum fits (1 + 2 + 3 = 6).
    assert got.tolist() == [[False, True, False, True, True], [True, True, True, False, False]]
    assert torch.equal(cap_clusters(chosen, priority, counts, 10**6), chosen)  # a large cap changes nothing
    assert not cap_clusters(chosen, priority, counts, 0).any()


@pytest.mark.parametrize("cap", [1, 9, 30])
def test_token_cap_bounds_each_heads_reads(cap):
    """resv[max_tokens]: every head reads at most the cap, and only tokens the uncapped selection reads
    (the order within the cap: test_cap_keeps_the_best_clusters_that_fit)."""
    free, capped = make_policy("resv", ratio=0.8), make_policy("resv", ratio=0.8, max_tokens=cap)
    keys = stream(free)
    stream(capped)
    n = keys.shape[1]
    q = torch.randn(HQ, 3, D, generator=torch.Generator().manual_seed(5))
    a, b = free.select(0, q, n, "frame"), capped.select(0, q, n, "frame")
    assert max(i.numel() for i in a.indices) > cap  # the cap bites
    for h in range(HKV):
        assert b.indices[h].numel() <= cap
        assert set(b.indices[h].tolist()) <= set(a.indices[h].tolist())
    assert b.stats["selected"] == [int(i.numel()) for i in b.indices]
