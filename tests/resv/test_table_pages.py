"""The HC table's key pages (issue 18): clusters out of scope are compacted to bfloat16 means, the
memory stays proportional to the clusters made, and nothing else about the table changes.

Streams of random keys with a low Hamming threshold open a new cluster for most tokens, so a few
hundred frames fill several pages of ``KEY_PAGE`` cluster ids in every head.
"""

import pytest
import torch

from vrex.kv.fast import available
from vrex.resv.hashing import make_hyperplanes
from vrex.resv.table import KEY_PAGE, HCTable

from _resv_checks import check_invariants

H, D, T = 2, 16, 24


def _table(**kw) -> HCTable:
    planes = make_hyperplanes(1, H, D, 32, seed=3)[0]
    kw.setdefault("threshold", 2)
    kw.setdefault("scope_frames", 4)
    return HCTable(H, D, planes, **kw)


def _frames(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(H, T, D, generator=g) for _ in range(n)]


def _fill(tab: HCTable, frames, fast: bool = False) -> torch.Tensor:
    for i, fr in enumerate(frames):
        tab.add(fr, i * T, fast=fast)
    return torch.cat(frames, 1)


def _pages(tab: HCTable):
    """``(head, first id, end id, dtype)`` of every key page holding clusters."""
    for h, pages in enumerate(tab.key_sums.pages):
        n = int(tab.n_clusters[h])
        for p, page in enumerate(pages):
            if p * KEY_PAGE < n:
                yield h, p * KEY_PAGE, min((p + 1) * KEY_PAGE, n), page.dtype


def test_pages_out_of_scope_are_compacted_to_bfloat16_means():
    tab, ref = _table(), _table(frozen_means="float32")
    frames = _frames(40)
    keys = _fill(tab, frames)
    _fill(ref, frames)
    assert int(tab.n_clusters.min()) >= 3 * KEY_PAGE  # the stream filled several pages in every head
    assert tab.compacted_pages() >= 2 and ref.compacted_pages() == 0
    # membership, counts, codes, clocks: identical; only the stored form of old means differs
    sa, sr = tab.state_dict(), ref.state_dict()
    for k in ("n_clusters", "codes", "count", "last", "leader_tok", "token_cluster", "active", "active_ok"):
        assert torch.equal(sa[k], sr[k]), k
    mean, valid = tab.mean_keys()
    exact, valid_r = ref.mean_keys()
    assert torch.equal(valid, valid_r)
    for h, a, b, dtype in _pages(tab):
        if dtype == torch.bfloat16:  # the float32 mean, rounded once
            assert torch.equal(mean[h, a:b], exact[h, a:b].to(torch.bfloat16).float())
            assert (tab.clock - tab.last[h, a:b] > tab.scope_frames).all()
        else:
            assert torch.equal(mean[h, a:b], exact[h, a:b])
    check_invariants(ref, keys)


def test_no_scope_window_compacts_nothing():
    tab = _table(scope_frames=None)
    _fill(tab, _frames(30))
    assert int(tab.n_clusters.min()) >= 2 * KEY_PAGE and tab.compacted_pages() == 0


@pytest.mark.parametrize("fast", [False, True])
def test_pages_are_made_as_needed_and_compaction_halves_old_ones(fast):
    if fast and not available():
        pytest.skip("the C++ kernels could not be built here")
    tab = _table()
    _fill(tab, _frames(60), fast=fast)
    n = tab.n_clusters.tolist()
    pages_needed = sum(-(-c // KEY_PAGE) for c in n) * KEY_PAGE * D * 4  # float32 pages, none spare
    assert sum(len(p) for p in tab.key_sums.pages) == sum(-(-c // KEY_PAGE) for c in n)
    assert tab.key_sums.nbytes() < 0.75 * pages_needed  # the compacted ones hold half
    flat = _table(frozen_means="float32")
    _fill(flat, _frames(60), fast=fast)
    assert flat.key_sums.nbytes() >= sum(n) * D * 4 > tab.key_sums.nbytes()


def test_state_round_trip_keeps_compacted_pages_and_goes_on_identically():
    frames = _frames(36)
    a = _table()
    _fill(a, frames[:30])
    assert a.compacted_pages() >= 1
    b = _table()
    b.load_state_dict(a.state_dict())
    assert list(_pages(b)) == list(_pages(a))
    assert torch.equal(a.mean_keys()[0], b.mean_keys()[0])
    for i, fr in enumerate(frames[30:], start=30):
        assert torch.equal(a.add(fr, i * T), b.add(fr, i * T))
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(sa[k], sb[k]), k
    assert a.compacted_pages() == b.compacted_pages()


def test_a_state_saved_before_pages_loads_and_compacts_at_the_next_step():
    frames = _frames(32)
    a, b = _table(), _table()
    _fill(a, frames[:30])
    state = a.state_dict()
    old = dict(state)
    del old["key_pages_compacted"]  # the format before key pages: float32 sums throughout
    ref = _table(frozen_means="float32")  # the same stream, every sum kept in float32
    _fill(ref, frames[:30])
    old["key_sum"] = ref.state_dict()["key_sum"]
    b.load_state_dict(old)
    assert b.compacted_pages() == 0
    for i, fr in enumerate(frames[30:], start=30):
        assert torch.equal(a.add(fr, i * T), b.add(fr, i * T))
    assert b.compacted_pages() == a.compacted_pages()
    assert torch.equal(a.mean_keys()[0], b.mean_keys()[0])


def test_rebuild_after_reindexed_positions_keeps_compacted_pages_compacted():
    tab, ref = _table(), _table(frozen_means="float32")
    frames = _frames(30)
    keys = _fill(tab, frames)
    _fill(ref, frames)
    rotated = keys.flip(-1)
    tab.rebuild(rotated)
    ref.rebuild(rotated)
    assert tab.compacted_pages() >= 1
    mean, exact = tab.mean_keys()[0], ref.mean_keys()[0]
    for h, a, b, dtype in _pages(tab):
        want = exact[h, a:b].to(torch.bfloat16).float() if dtype == torch.bfloat16 else exact[h, a:b]
        assert torch.equal(mean[h, a:b], want)
    check_invariants(ref, rotated)


@pytest.mark.skipif(not available(), reason="the C++ kernels could not be built here")
def test_fused_add_compacts_as_the_reference_does():
    fast, ref = _table(), _table()
    frames = _frames(40, seed=1)
    for i, fr in enumerate(frames):
        assert torch.equal(fast.add(fr, i * T, fast=True), ref.add(fr, i * T))
    assert fast.compacted_pages() == ref.compacted_pages() >= 2
    sa, sr = fast.state_dict(), ref.state_dict()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(sa[k], sr[k]), k


def test_frozen_means_is_checked():
    with pytest.raises(ValueError, match="frozen_means"):
        _table(frozen_means="float16")


@pytest.mark.skipif(not available(), reason="the C++ kernels could not be built here")
def test_token_cluster_pages_narrow_behind_the_stream(monkeypatch):
    """The token -> cluster map's full pages become int16 offsets (vrex.kv.index) as the stream passes
    them, in the fused add and in the reference alike; the kernel that maps chosen clusters to tokens
    reads them to the same ids as the reference mask, and a state round trip gives the same map."""
    monkeypatch.setattr("vrex.kv.index.PAGE_TOKENS", 64)  # 40 frames of 24 tokens: 15 pages
    fast, ref = _table(), _table()
    for i, fr in enumerate(_frames(40, seed=2)):
        assert torch.equal(fast.add(fr, i * T, fast=True), ref.add(fr, i * T))
    n = 40 * T
    assert fast.tc.narrow_pages() == ref.tc.narrow_pages() == n // 64  # every full page, not the last one
    assert fast.tc.nbytes() < 0.6 * len(fast.tc.pages) * H * 64 * 4
    assert torch.equal(fast.token_cluster, ref.token_cluster)
    chosen = torch.rand(H, int(fast.n_clusters.max()), generator=torch.Generator().manual_seed(4)) > 0.7
    ids, offs = fast.chosen_token_ids(chosen, n)
    mask = ref.token_mask(chosen, n)
    for h in range(H):
        assert torch.equal(ids[offs[h] : offs[h + 1]], torch.nonzero(mask[h]).flatten())
    again = _table()
    again.load_state_dict(fast.state_dict())
    assert torch.equal(again.token_cluster, fast.token_cluster)
