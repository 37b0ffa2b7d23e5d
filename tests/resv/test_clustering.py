import torch
from hypothesis import given, settings, strategies as st

from vrex.resv.clustering import cluster_frame, cluster_frame_ref, new_cluster_ids
from vrex.resv.hashing import hash_codes, make_hyperplanes


def _codes(g, *shape, n_bytes=1, alphabet=None):
    if alphabet is None:
        return torch.randint(0, 256, (*shape, n_bytes), generator=g).to(torch.uint8)
    idx = torch.randint(0, len(alphabet), shape, generator=g)
    return torch.tensor(alphabet, dtype=torch.uint8)[idx].unsqueeze(-1)


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 100_000),
    H=st.integers(1, 3),
    T=st.integers(1, 9),
    C=st.integers(0, 7),
    threshold=st.integers(0, 6),
    inclusive=st.booleans(),
    rule=st.sampled_from(["nearest", "first"]),
    intra=st.sampled_from(["tokens", "leaders"]),
    small=st.booleans(),
)
def test_fast_matches_reference(seed, H, T, C, threshold, inclusive, rule, intra, small):
    g = torch.Generator().manual_seed(seed)
    # a small alphabet of close codes forces ties and chains of matches
    alphabet = [0b0000_0000, 0b0000_0001, 0b0000_0011, 0b0000_0111, 0b1111_0000, 0b1111_1111] if small else None
    new = _codes(g, H, T, alphabet=alphabet)
    cand = _codes(g, H, C, alphabet=alphabet)
    valid = torch.rand(H, C, generator=g) > 0.3
    fa = cluster_frame(new, cand, valid, threshold=threshold, inclusive=inclusive, rule=rule, intra=intra)
    for h in range(H):
        cl = [bytes(cand[h, j].tolist()) if valid[h, j] else None for j in range(C)]
        a, lead, comps = cluster_frame_ref([bytes(new[h, t].tolist()) for t in range(T)], cl,
                                           threshold=threshold, inclusive=inclusive, rule=rule, intra=intra)
        assert fa.assign[h].tolist() == a, (h, fa.assign[h].tolist(), a)
        assert fa.is_leader[h].tolist() == lead
        assert int(fa.comparisons[h]) == comps


def test_threshold_strict_vs_inclusive():
    new = torch.tensor([[[0b0111_1111]]], dtype=torch.uint8)  # distance 7 from 0
    cand = torch.tensor([[[0]]], dtype=torch.uint8)
    assert cluster_frame(new, cand, threshold=7).is_leader.all()  # 7 < 7 is false
    assert cluster_frame(new, cand, threshold=7, inclusive=True).assign.tolist() == [[0]]


def test_within_frame_spatial_clustering_and_ids():
    new = torch.tensor([[[0], [1], [255], [3], [254]]], dtype=torch.uint8)
    fa = cluster_frame(new, torch.zeros(1, 0, 1, dtype=torch.uint8), threshold=3)
    # tokens 0,1,3 together (leader 0), tokens 2,4 together (leader 2)
    assert fa.assign.tolist() == [[0, 0, 2, 0, 2]]
    ids = new_cluster_ids(fa, torch.zeros(1, 0, dtype=torch.int64), torch.tensor([10]))
    assert ids.tolist() == [[10, 10, 11, 10, 11]]


def test_nearest_prefers_existing_on_ties_and_closest_overall():
    cand = torch.tensor([[[0b0000_0011], [0b0000_0001]]], dtype=torch.uint8)
    new = torch.tensor([[[0b0000_0000]]], dtype=torch.uint8)
    assert cluster_frame(new, cand, threshold=3, rule="nearest").assign.tolist() == [[1]]
    assert cluster_frame(new, cand, threshold=3, rule="first").assign.tolist() == [[0]]


def test_real_hash_codes_cluster_similar_keys():
    torch.manual_seed(0)
    planes = make_hyperplanes(1, 2, 64, 32, seed=0)[0]
    base = torch.randn(2, 4, 64)
    frame1 = base
    frame2 = base + 0.05 * torch.randn(2, 4, 64)  # the next frame: nearly identical keys
    c1, c2 = hash_codes(frame1, planes), hash_codes(frame2, planes)
    fa = cluster_frame(c2, c1, threshold=7)
    assert (fa.assign == torch.arange(4)).all()  # each token joins its previous-frame twin
