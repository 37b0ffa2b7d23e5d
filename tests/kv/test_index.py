"""vrex.kv.index.PagedIndex (int32 per-token maps in fixed pages) against a plain int64 tensor, and its
overflow checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from vrex.kv.index import INT32_MAX, NARROW_SPAN, IndexOverflow, PagedIndex

ops = st.lists(st.tuples(st.sampled_from(["write", "scatter", "read", "take", "gather", "compact"]),
                         st.integers(0, 60), st.integers(0, 25), st.integers(0, 10**6)), min_size=1, max_size=25)


def _values(rows: int, n: int, seed: int) -> torch.Tensor:
    """Spread over the whole int32 range (never narrow), or close together near either end of it
    (narrow pages, biases at the extremes), or straddling 2^16 apart (narrow only just, or not)."""
    g = torch.Generator().manual_seed(seed)
    kind = seed % 4
    if kind == 0:
        return torch.randint(-1, INT32_MAX, (rows, n), generator=g)
    if kind == 1:
        return torch.randint(-2**31, -2**31 + 70000, (rows, n), generator=g)
    if kind == 2:
        return torch.randint(INT32_MAX - 70000, INT32_MAX + 1, (rows, n), generator=g)
    return 1000 + torch.randint(0, 2, (rows, n), generator=g) * (NARROW_SPAN + seed % 2)


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 3), page=st.sampled_from([1, 4, 8, 16]), ops=ops)
@example(rows=1, page=1, ops=[("write", 0, 1, 0), ("compact", 1, 0, 0), ("write", 0, 1, 0)])  # one row: its bias view
def test_paged_index_equals_a_plain_tensor(rows, page, ops):
    """Writes, scatters, compaction to int16 offsets and the three reads over page boundaries (pages of
    1 to 16 tokens) give what one int64 tensor gives; values include negatives (-1: no slot), large ones
    (up to 2^31 - 1) and spreads at the edge of what a narrow page holds; writes into narrow pages."""
    idx = PagedIndex(rows, "test map", page=page)
    model = torch.zeros(rows, 0, dtype=torch.int64)
    bound = 0
    for op, a, n, seed in ops:
        g = torch.Generator().manual_seed(seed)
        values = _values(rows, n, seed)
        if op == "compact":
            idx.compact(a)
            bound = max(bound, a)
            held = torch.zeros(rows, idx.capacity, dtype=torch.int64)  # entries never written hold 0
            held[:, : model.shape[1]] = model
            for p, pg in enumerate(idx.pages):
                block = held[:, p * page : (p + 1) * page]
                fits = int((block.amax(1) - block.amin(1)).max()) <= NARROW_SPAN
                if pg.dtype == torch.int16:  # only pages wholly below a bound asked for, that fit
                    assert (p + 1) * page <= bound and fits
                elif (p + 1) * page <= a:  # every such page below this call's bound
                    assert not fits
            continue
        if op == "write":
            idx.write(a, values)
            if model.shape[1] < a + n:
                model = torch.cat([model, torch.zeros(rows, a + n - model.shape[1], dtype=torch.int64)], 1)
            model[:, a : a + n] = values
            assert idx.capacity - model.shape[1] < page  # less than one page unused
            continue
        N = model.shape[1]
        if N == 0:
            continue
        if op == "scatter":
            ids = torch.stack([torch.randperm(N, generator=g)[: min(n, N)] for _ in range(rows)])
            idx.scatter(ids, values[:, : ids.shape[1]])
            model.scatter_(1, ids, values[:, : ids.shape[1]])
        elif op == "read":
            a = min(a, N)
            b = min(N, a + n)
            assert torch.equal(idx.read(a, b), model[:, a:b])
        elif op == "take":
            ids = torch.unique(torch.randint(0, N, (n,), generator=g))
            assert torch.equal(idx.take(ids), model[:, ids])
            assert torch.equal(idx.take(ids, row=rows - 1), model[rows - 1, ids])
        else:
            ids = torch.randint(0, N, (rows, n), generator=g)
            assert torch.equal(idx.gather(ids), model.gather(1, ids))


def test_pages_never_move():
    """Growing to many pages keeps every existing page where it was (no copy, nothing freed)."""
    idx = PagedIndex(3, "test map", page=16)
    idx.write(0, torch.arange(10).expand(3, 10))
    first = idx.pages[0].data_ptr()
    for start in range(10, 1000, 30):  # the last write ends at 1000: 63 pages, the last one half full
        idx.write(start, torch.arange(start, start + 30).expand(3, 30))
    assert idx.pages[0].data_ptr() == first and len(idx.pages) == 63
    assert all(p.dtype == torch.int32 for p in idx.pages)
    assert idx.nbytes() == len(idx.pages) * 3 * 16 * 4


def test_overflow_is_refused_by_name_before_anything_changes():
    idx = PagedIndex(2, "layer 7's token -> slot map", page=8)
    idx.write(0, torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(IndexOverflow, match="layer 7's token -> slot map: 2147483649 tokens"):
        idx.ensure(2**31 + 1)  # would need 2^28 pages: refused before allocating one
    assert len(idx.pages) == 1
    with pytest.raises(IndexOverflow, match=f"value {2**31} does not fit"):
        idx.write(2, torch.tensor([[5, 2**31], [6, 7]]))
    with pytest.raises(IndexOverflow, match=f"value {-2**31 - 1} does not fit"):
        idx.scatter(torch.tensor([[0], [1]]), torch.tensor([[-2**31 - 1], [0]]))
    assert torch.equal(idx.read(0, 2), torch.tensor([[1, 2], [3, 4]]))  # nothing was written
    idx.write(2, torch.tensor([[INT32_MAX], [-2**31]]))  # the extremes fit
    assert idx.read(2, 3).flatten().tolist() == [INT32_MAX, -2**31]


def test_final_pages_are_narrow_and_read_the_same():
    """Pages wholly below ``compact``'s bound whose rows span at most 2^16 - 1 become int16 offsets
    (about half the bytes), the rest stay int32, and every read gives the same values; a write into a
    narrow page makes it int32 again, with the other entries kept."""
    rows, page = 3, 64
    idx = PagedIndex(rows, "test map", page=page)
    g = torch.Generator().manual_seed(0)
    slots = torch.arange(10 * page).expand(rows, -1) + torch.randint(-20, 20, (rows, 10 * page), generator=g)
    slots[1, 3 * page + 5] = 5 * 10**6  # page 3 of row 1 spreads wider than 16 bits: stays int32
    idx.write(0, slots)
    wide_bytes = idx.nbytes()
    idx.compact(7 * page + 10)  # pages 0..6 are wholly below; page 7 is not
    assert [p.dtype for p in idx.pages] == [torch.int16] * 3 + [torch.int32] + [torch.int16] * 3 + [torch.int32] * 3
    assert idx.narrow_pages() == 6
    assert idx.nbytes() < 0.55 * wide_bytes + 4 * rows * page * 4
    assert torch.equal(idx.read(0, 10 * page), slots)
    ids = torch.unique(torch.randint(0, 10 * page, (200,), generator=g))
    assert torch.equal(idx.take(ids), slots[:, ids]) and torch.equal(idx.take(ids, row=2), slots[2, ids])
    gids = torch.randint(0, 10 * page, (rows, 300), generator=g)
    assert torch.equal(idx.gather(gids), slots.gather(1, gids))
    idx.scatter(torch.tensor([[5], [6], [7]]), torch.tensor([[-1], [-2], [-3]]))
    slots[0, 5], slots[1, 6], slots[2, 7] = -1, -2, -3
    assert idx.pages[0].dtype == torch.int32 and torch.equal(idx.read(0, 10 * page), slots)
    idx.compact(7 * page)
    assert idx.pages[0].dtype == torch.int16 and torch.equal(idx.read(0, 10 * page), slots)
