
import pytest
import torch
from hypothesis import given, settings, strategies as st

from vrex.resv.wicsum import normalize_scores, wicsum_ref, wicsum_select


def _check(weights, counts, ratio, valid=None, sort_by="score", nb=None):
    """weights float32 [R, C]; compare every row against the reference, exactly."""
    res = wicsum_select(weights, counts, ratio, valid, sort_by=sort_by, num_buckets=nb)
    for r in range(weights.shape[0]):
        taken, t_star, sb = wicsum_ref(
            weights[r].tolist(), counts.tolist(), ratio, None if valid is None else valid.tolist(),
            sort_by=sort_by, num_buckets=nb,
        )
        assert int(res.taken[r]) == t_star, (r, weights[r], counts, ratio)
        got = set(torch.nonzero(res.selected[r]).flatten().tolist())
        assert got == set(taken)
        if nb:
            assert int(res.scanned_bucketed[r]) == sb
    return res


floats = st.floats(-50, 50, allow_nan=False, width=32)


@settings(max_examples=400, deadline=None)
@given(
    data=st.data(),
    C=st.integers(1, 12),
    R=st.integers(1, 4),
    ratio=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.8, 0.999, 1.0, 1.5]),
    sort_by=st.sampled_from(["score", "weighted"]),
    nb=st.sampled_from([None, 1, 4, 16]),
    mode=st.sampled_from(["softmax", "shift_min", "relu", "raw"]),
)
def test_wicsum_matches_reference(data, C, R, ratio, sort_by, nb, mode):
    # small value alphabet forces ties
    vals = data.draw(st.lists(st.lists(st.sampled_from([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 2.0]) | floats,
                                       min_size=C, max_size=C), min_size=R, max_size=R))
    counts = torch.tensor(data.draw(st.lists(st.integers(1, 40), min_size=C, max_size=C)))
    valid = torch.tensor(data.draw(st.lists(st.booleans(), min_size=C, max_size=C)))
    if data.draw(st.booleans()):
        valid = None
    w = normalize_scores(torch.tensor(vals), valid, mode=mode, scale=0.5)
    _check(w, counts, ratio, valid, sort_by, nb)


def test_single_cluster_and_all_ties():
    w = torch.tensor([[2.0]])
    res = _check(w, torch.tensor([5]), 0.3)
    assert res.taken.tolist() == [1]
    w = torch.ones(2, 6)
    res = _check(w, torch.ones(6, dtype=torch.int64), 0.5)
    # ties: lowest index first; need Acc > 3 -> 4 clusters 0..3
    assert torch.nonzero(res.selected[0]).flatten().tolist() == [0, 1, 2, 3]


def test_paper_figure_example():
    # positive integer scores, ratio 0.8 (Fig. 9 style)
    w = torch.tensor([[5.0, 1.0, 3.0, 2.0]])
    tc = torch.tensor([2, 4, 1, 3])
    # products 10, 4, 3, 6 ; sorted by score: 5(10), 3(3), 2(6), 1(4) ; Sum 23 ; Th 18.4
    # Acc: 10, 13, 19 > 18.4 -> t* = 3 -> clusters {0, 2, 3}
    res = _check(w, tc, 0.8)
    assert res.taken.tolist() == [3]
    assert torch.nonzero(res.selected[0]).flatten().tolist() == [0, 2, 3]


def test_negative_scores_raw_falls_back_to_all_and_softmax_is_defined():
    s = torch.tensor([[-5.0, -1.0, -3.0]])
    tc = torch.tensor([1, 1, 1])
    raw = normalize_scores(s, mode="raw")
    res = _check(raw, tc, 0.3)
    # raw logits: Sum = -9, Th = -2.7, Acc(1) = -1 > Th -> one cluster (degenerate but defined)
    assert res.taken.tolist() == [1]
    zero = _check(torch.zeros(1, 3), tc, 0.3)
    assert zero.taken.tolist() == [3]  # Sum = 0: no prefix passes -> no early exit, take all
    sm = normalize_scores(s, mode="softmax")
    assert (sm > 0).all() and float(sm.max()) == 1.0
    res = _check(sm, tc, 0.3)
    assert res.taken.tolist() == [1] and res.selected[0, 1]


def test_ratio_ge_one_takes_everything_valid():
    w = torch.rand(3, 10)
    valid = torch.tensor([True] * 7 + [False] * 3)
    res = _check(w, torch.randint(1, 9, (10,)), 1.0, valid)
    assert res.selected[:, :7].all() and not res.selected[:, 7:].any()
    assert res.scan_fraction() == 1.0


def test_batched_heads_and_union():
    torch.manual_seed(0)
    w = torch.rand(2, 3, 5)  # [H, R, C]
    cnt = torch.randint(1, 5, (2, 5))
    valid = torch.tensor([[True] * 5, [True, True, False, True, False]])
    res = wicsum_select(w, cnt, 0.4, valid)
    for h in range(2):
        for r in range(3):
            taken, t, _ = wicsum_ref(w[h, r].tolist(), cnt[h].tolist(), 0.4, valid[h].tolist())
            assert set(torch.nonzero(res.selected[h, r]).flatten().tolist()) == set(taken)
    assert torch.equal(res.union(), res.selected.any(1))


def test_no_valid_clusters():
    res = wicsum_select(torch.rand(2, 4), torch.ones(4), 0.3, torch.zeros(4, dtype=torch.bool), num_buckets=4)
    assert res.taken.tolist() == [0, 0] and not res.selected.any() and res.scan_fraction() == 0.0
    res = wicsum_select(torch.rand(2, 0), torch.ones(0), 0.3)
    assert res.selected.shape == (2, 0)


def test_softmax_weights_track_attention_mass():
    # with one token per cluster, softmax weights * TC are proportional to attention probs
    torch.manual_seed(1)
    s = torch.randn(1, 50) * 3
    w = normalize_scores(s, mode="softmax")
    p = torch.softmax(s, -1)
    assert torch.allclose(w / w.sum(), p, atol=1e-6)
    res = wicsum_select(w, torch.ones(50), 0.9)
    mass = float(p[0][res.selected[0]].sum())
    assert mass > 0.9 and mass - float(p[0][res.selected[0]].min()) <= 0.9 + 1e-6


def test_invalid_mode():
    with pytest.raises(ValueError):
        normalize_scores(torch.zeros(1, 1), mode="nope")
    with pytest.raises(ValueError):
        wicsum_select(torch.zeros(1, 1), torch.ones(1), 0.3, sort_by="nope")
