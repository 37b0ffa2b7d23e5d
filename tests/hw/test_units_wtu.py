"""WTU vs the software WiCSum (vrex.resv.wicsum): one fixed-point arithmetic, so equal on every input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vrex.hw.wtu import WTUConfig, wtu_row, wtu_select
from vrex.resv.wicsum import normalize_scores, wicsum_select


def software(scores, counts, valid, cfg: WTUConfig):
    w = normalize_scores(scores, valid, mode=cfg.norm, scale=cfg.scale)
    return w, wicsum_select(w, counts, cfg.ratio, valid, sort_by=cfg.sort_by, num_buckets=cfg.num_buckets)


def assert_equal(hw, sw):
    assert torch.equal(hw.selected, sw.selected)
    assert torch.equal(hw.taken, sw.taken)
    assert torch.equal(hw.scanned, sw.scanned_bucketed)


dyadic = st.integers(-255, 255).map(lambda k: k / 8.0)  # exact in BF16 (8 significant bits)


@st.composite
def rows(draw, lo=-255, hi=255):
    C = draw(st.integers(1, 24))
    R = draw(st.integers(1, 3))
    pool = [k / 8.0 for k in draw(st.lists(st.integers(lo, hi), min_size=1, max_size=4))]
    # draw from a small pool half of the time: ties and all-equal rows
    elem = st.one_of(st.integers(lo, hi).map(lambda k: k / 8.0), st.sampled_from(pool))
    scores = torch.tensor(draw(st.lists(st.lists(elem, min_size=C, max_size=C), min_size=R, max_size=R)))
    counts = torch.tensor(draw(st.lists(st.integers(1, 64), min_size=C, max_size=C)))
    valid = torch.tensor(draw(st.lists(st.booleans(), min_size=C, max_size=C)))
    if draw(st.booleans()):
        valid[:] = True
    return scores, counts, valid


RATIOS = st.one_of(st.sampled_from([0.0, 0.3, 0.5, 0.8, 1.0]), st.floats(0.0, 1.0))


@settings(max_examples=300, deadline=None)
@given(
    data=rows(),
    norm=st.sampled_from(["shift_min", "relu", "raw"]),
    scale=st.sampled_from([None, 0.5, 2.0]),
    sort_by=st.sampled_from(["score", "weighted"]),
    ratio=RATIOS,
    nb=st.integers(1, 16),
)
def test_wtu_equals_software_linear_norms(data, norm, scale, sort_by, ratio, nb):
    scores, counts, valid = data
    cfg = WTUConfig(ratio=ratio, norm=norm, scale=scale, sort_by=sort_by, num_buckets=nb)
    _, sw = software(scores, counts, valid, cfg)
    hw = wtu_select(scores, counts, valid, cfg)
    assert_equal(hw, sw)
    assert bool((hw.taken <= hw.scanned).all()) and bool((hw.scanned <= valid.sum()).all())


@settings(max_examples=200, deadline=None)
@given(data=rows(-40, 40), sort_by=st.sampled_from(["score", "weighted"]), ratio=RATIOS, nb=st.integers(1, 16))
def test_wtu_equals_software_softmax(data, sort_by, ratio, nb):
    # exp spreads the weights over many binades: float64 sums of them are rarely exact, the grid's always are
    scores, counts, valid = data
    cfg = WTUConfig(ratio=ratio, norm="softmax", scale=1.0, sort_by=sort_by, num_buckets=nb)
    _, sw = software(scores, counts, valid, cfg)
    assert_equal(wtu_select(scores, counts, valid, cfg), sw)


def test_wtu_equals_software_on_realistic_softmax_rows():
    """Random logits (BF16), 1/sqrt(128) softmax, 64 rows of 200 clusters: the same selection row by row
    (before the grid, the software's float64 sums in sorted order could differ at a near tie)."""
    g = torch.Generator().manual_seed(1)
    R, C = 64, 200
    scores = (torch.randn(R, C, generator=g) * 12).to(torch.bfloat16).to(torch.float32)
    counts = torch.randint(1, 80, (C,), generator=g)
    for ratio in (0.3, 0.9):
        cfg = WTUConfig(ratio=ratio, norm="softmax", scale=1 / math.sqrt(128), num_buckets=16)
        _, sw = software(scores, counts, None, cfg)
        hw = wtu_select(scores, counts, None, cfg)
        assert_equal(hw, sw)
        assert hw.acc_bits <= 40 + math.ceil(math.log2(C)) + 2  # the grid bounds the accumulator, as documented


def test_tiny_products_fall_below_the_grid():
    """A product under 2^-40 of the row's largest counts 0: it can no longer tip the threshold."""
    w = [1.0, 2.0**-45, 2.0**-45]
    counts = [1, 1, 1]
    # Th = 1.0 * Sum: exact sums would exceed it only with every cluster; on the grid the tiny ones add 0
    row = wtu_row(w, counts, [True] * 3, WTUConfig(ratio=1.0, norm="raw"))
    sw = wicsum_select(torch.tensor([w]), torch.tensor(counts), 1.0)
    assert row.t_star == int(sw.taken[0]) == 3  # nothing passes Acc > Sum: everything taken
    row = wtu_row(w, counts, [True] * 3, WTUConfig(ratio=0.999999, norm="raw"))
    sw = wicsum_select(torch.tensor([w]), torch.tensor(counts), 0.999999)
    assert row.t_star == int(sw.taken[0]) == 1


@pytest.mark.parametrize(
    "scores,counts,ratio,expect",
    [
        ([3.0], [5], 0.3, [0]),  # one cluster
        ([1.0] * 10, [1] * 10, 0.3, [0, 1, 2, 3]),  # all equal: Th = fl64(0.3 * 10) = 3.0, Acc(3) = 3 is not > 3
        ([-1.0, -2.0, -3.0], [1, 1, 1], 0.3, [0]),  # negative raw sum: Th = -1.8, Acc(1) = -1 > Th
        ([0.0, 0.0], [4, 4], 0.3, [0, 1]),  # all-zero weights: nothing passes, everything taken
    ],
)
def test_wtu_edge_rows(scores, counts, ratio, expect):
    cfg = WTUConfig(ratio=ratio, norm="raw")
    sw = wicsum_select(torch.tensor([scores]), torch.tensor(counts), ratio, num_buckets=cfg.num_buckets)
    row = wtu_row(scores, counts, [True] * len(scores), cfg)
    assert row.taken == sorted(sw.selected[0].nonzero().flatten().tolist()) == expect


def test_wtu_early_exit_and_cycles():
    """A peaked row exits in the top bucket: few elements scanned, far fewer cycles than a full scan."""
    C = 1024
    scores = torch.full((1, C), -8.0)
    scores[0, :5] = 8.0
    counts = torch.ones(C, dtype=torch.int64)
    hw = wtu_select(scores, counts, None, WTUConfig(norm="softmax", scale=1.0))
    assert int(hw.taken[0]) <= 5 and int(hw.scanned[0]) == 5
    assert hw.cycles < 2 * C // 16 + 64
    flat = wtu_select(torch.zeros(1, C), counts, None, WTUConfig(norm="softmax"))
    assert int(flat.scanned[0]) == C  # all keys equal: one bucket holds everything


def test_wtu_rejects_rows_beyond_its_memories():
    with pytest.raises(ValueError):
        wtu_select(torch.zeros(1, 5000), torch.ones(5000, dtype=torch.int64))
    with pytest.raises(ValueError):
        wtu_row([1.0], [1 << 16], [True], WTUConfig())
