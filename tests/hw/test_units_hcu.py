"""HCU vs the software ReSV clustering (vrex.resv.clustering / HCTable): equal on every input."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vrex.hw.hcu import HCUConfig, hcu_frame, hcu_frame_head
from vrex.resv.clustering import cluster_frame, cluster_frame_ref, new_cluster_ids
from vrex.resv.hashing import hash_codes, make_hyperplanes
from vrex.resv.table import HCTable

RULES = st.sampled_from(["nearest", "first"])
INTRA = st.sampled_from(["tokens", "leaders"])


def codes_strategy(n_bytes: int, max_len: int, base: st.SearchStrategy | None = None):
    code = st.lists(st.integers(0, 255), min_size=n_bytes, max_size=n_bytes)
    return st.lists(code, min_size=0, max_size=max_len)


@st.composite
def clustered_codes(draw, n_bytes: int, max_len: int):
    """Codes near a few centres (small Hamming distances, so joins and ties happen)."""
    n_centres = draw(st.integers(1, 3))
    centres = [draw(st.integers(0, (1 << (8 * n_bytes)) - 1)) for _ in range(n_centres)]
    out = []
    for _ in range(draw(st.integers(0, max_len))):
        c = centres[draw(st.integers(0, n_centres - 1))]
        for _ in range(draw(st.integers(0, 6))):
            c ^= 1 << draw(st.integers(0, 8 * n_bytes - 1))
        out.append(list(c.to_bytes(n_bytes, "little")))
    return out


@settings(max_examples=150, deadline=None)
@given(
    new=st.one_of(clustered_codes(4, 12), codes_strategy(4, 12)),
    cands=st.one_of(clustered_codes(4, 10), codes_strategy(4, 10)),
    holes=st.lists(st.booleans(), min_size=10, max_size=10),
    threshold=st.integers(0, 12),
    inclusive=st.booleans(),
    rule=RULES,
    intra=INTRA,
    early=st.booleans(),
)
def test_hcu_equals_software_reference(new, cands, holes, threshold, inclusive, rule, intra, early):
    cand = [None if holes[j] and j % 2 else bytes(c) for j, c in enumerate(cands)]
    cfg = HCUConfig(n_hp=32, threshold=threshold, inclusive=inclusive, rule=rule, intra=intra, early_abort=early)
    hw = hcu_frame_head([bytes(c) for c in new], cand, cfg)
    sw = cluster_frame_ref([bytes(c) for c in new], cand, threshold=threshold, inclusive=inclusive, rule=rule, intra=intra)
    assert (hw.assign, hw.is_leader, hw.comparisons) == sw
    # the datapath never does more than full-length distances, and aborts only shorten it
    assert hw.xor_steps <= hw.comparisons * cfg.steps_per_distance


@settings(max_examples=60, deadline=None)
@given(
    H=st.integers(1, 3),
    T=st.integers(1, 10),
    C=st.integers(0, 8),
    seed=st.integers(0, 2**16),
    threshold=st.integers(0, 16),
    rule=RULES,
    intra=INTRA,
    nhp=st.sampled_from([8, 16, 32, 40]),
)
def test_hcu_tensor_front_end_equals_cluster_frame(H, T, C, seed, threshold, rule, intra, nhp):
    g = torch.Generator().manual_seed(seed)
    B = (nhp + 7) // 8
    mask_last = (1 << (nhp - 8 * (B - 1))) - 1  # padding bits are zero in software codes
    new = torch.randint(0, 256, (H, T, B), generator=g, dtype=torch.int64)
    cand = torch.randint(0, 256, (H, C, B), generator=g, dtype=torch.int64)
    new[..., -1] &= mask_last
    cand[..., -1] &= mask_last
    # make near-duplicates so that clustering actually happens
    if T > 1:
        new[:, 1:] = torch.where(torch.rand(H, T - 1, 1, generator=g) < 0.5, new[:, :1], new[:, 1:])
    new, cand = new.to(torch.uint8), cand.to(torch.uint8)
    valid = torch.rand(H, C, generator=g) < 0.8
    cfg = HCUConfig(n_hp=nhp, threshold=threshold, rule=rule, intra=intra)
    hw = hcu_frame(new, cand, valid, cfg)
    sw = cluster_frame(new, cand, valid, threshold=threshold, rule=rule, intra=intra)
    assert torch.equal(hw.assign, sw.assign)
    assert torch.equal(hw.is_leader, sw.is_leader)
    assert torch.equal(hw.comparisons, sw.comparisons)


def test_hcu_all_equal_codes_form_one_cluster_and_early_abort_saves_cycles():
    code = bytes([0x5A, 0xA5, 0xFF, 0x00])
    cfg = HCUConfig()
    hw = hcu_frame_head([code] * 8, [], cfg)
    assert hw.assign == [0] * 8 and hw.is_leader == [True] + [False] * 7
    far = [bytes([i, i, i, i]) for i in (0x00, 0xFF)]  # distance 32 from each other
    full = hcu_frame_head(far * 4, [], HCUConfig(early_abort=False))
    short = hcu_frame_head(far * 4, [], HCUConfig(early_abort=True))
    assert full.assign == short.assign
    assert short.xor_steps < full.xor_steps


def test_hcu_drives_the_software_hc_table_to_the_same_ids():
    """The HCU fed with HCTable's candidates yields the ids HCTable.add assigns, frame after frame."""
    torch.manual_seed(0)
    H, D, T = 2, 16, 10
    planes = make_hyperplanes(1, H, D, 32, seed=3)[0]
    table = HCTable(H, D, planes, threshold=7, scope_frames=4)
    base = torch.randn(H, T, D)
    start = 0
    for f in range(8):
        keys = base + 0.3 * torch.randn(H, T, D)  # temporally correlated frames
        codes = hash_codes(keys, planes)
        cand_ids, cand_valid = table.candidates()
        cand_codes = table.codes.gather(1, cand_ids.unsqueeze(-1).expand(H, cand_ids.shape[1], table.B))
        hw = hcu_frame(codes, cand_codes, cand_valid, HCUConfig(threshold=7))
        n_before = table.n_clusters.clone()
        ids_sw = table.add(keys, start)
        ids_hw = new_cluster_ids(hw, cand_ids, n_before)  # the HCU's table writes, in table ids
        assert torch.equal(ids_hw, ids_sw), f"frame {f}"
        start += T
    assert int(table.n_clusters.sum()) < H * T * 8  # clustering did merge tokens


def test_hcu_memory_tiling_counts():
    cfg = HCUConfig()  # 4 B codes: 1024 cached codes per tile, 32 frame tokens per tile
    cands = [bytes([j & 255, j >> 8, 0, 0]) for j in range(2500)]
    r = hcu_frame_head([bytes([1, 2, 3, 4])] * 40, cands, cfg)
    assert r.frame_tiles == 2 and r.cache_tiles == 2 * 3
    assert r.dram_bytes == 40 * 4 + 2 * 2500 * 4
