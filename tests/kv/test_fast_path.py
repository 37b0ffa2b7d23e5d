"""The fast path (vrex.kv.fast, C++) held equal to the PyTorch reference, Quest-style.

Units: WiCSum union, cluster -> token ids, read plans and the planned gather, on random inputs. End to end: ReSV's fused selection equals its reference selection call by call on the real
model's keys and queries; every policy's session gives the same logits and the same store
accounting with either kernel set, with and without a host tier.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vrex.kv.cache import KeepConfig, VrexCache, _attention
from vrex.kv.fast import load
from vrex.kv.index import PagedIndex
from vrex.kv.policies import POLICIES, ReSVPolicy, make_policy
from vrex.kv.policies.resv import _FUSED_NORM
from vrex.kv.policy import PackedSelection, Selection
from vrex.kv.store import KVStore
from vrex.resv.wicsum import normalize_scores, wicsum_select

ext = load()
# The kernels against the reference in float32: the same terms summed in another order (online softmax,
# SIMD lanes). The extension is built with -march=native, so the rounding follows the CPU: on an AMD EPYC
# (AVX-512) a 600-key decode row differed by 3.2e-6, past the 2e-6 that had held on an Intel Xeon. A
# wrong rescale or a missed key moves outputs by 1e-2 or more.
FP32_ATOL, FP32_RTOL = 1e-5, 1e-4


@settings(max_examples=60, deadline=None)
@given(H=st.integers(1, 3), R=st.integers(1, 9), C=st.integers(1, 40) | st.integers(300, 3000), ratio=st.floats(0.0, 1.0),
       weighted=st.booleans(), ties=st.booleans(), seed=st.integers(0, 10**6),
       mode=st.sampled_from(["shift_min", "raw", "relu", "softmax"]), spread=st.sampled_from([1.0, 300.0]))
def test_wicsum_union_equals_reference(H, R, C, ratio, weighted, ties, seed, mode, spread):
    # large C: the C++ bucket scan refines the crossing bucket over several levels; raw/relu: negative keys
    # and -0.0 (equal to +0.0); spread 300: softmax weights over ~100 binades, many products under the grid
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(H, R, C, generator=g) * spread
    if ties:  # many equal weights: the stable order decides
        scores = scores.round()
    valid = torch.rand(H, C, generator=g) > 0.2
    counts = torch.randint(1, 9, (H, C), generator=g) * valid
    w = normalize_scores(scores, valid, mode=mode, scale=0.125)
    if ties:
        w[..., ::3] = -0.0 * w[..., ::3].abs()
    ref = wicsum_select(w, counts, ratio, valid, sort_by="weighted" if weighted else "score")
    chosen, taken = ext.wicsum_union(w, counts, valid, ratio, weighted)
    assert torch.equal(chosen, ref.union() & valid)
    assert torch.equal(taken, ref.taken)
    if mode != "softmax":  # normalised in C++ from the raw scores: the same weights, so the same choice
        mode_id = _FUSED_NORM[mode]
        if ties:
            scores[..., ::3] = -0.0 * scores[..., ::3].abs()
            ref = wicsum_select(normalize_scores(scores, valid, mode=mode, scale=0.125), counts, ratio, valid,
                                sort_by="weighted" if weighted else "score")
        chosen, taken = ext.wicsum_union_scores(scores, counts, valid, mode_id, 0.125, ratio, weighted)
        assert torch.equal(chosen, ref.union() & valid)
        assert torch.equal(taken, ref.taken)


@pytest.mark.parametrize("C", [5, 40, 2000])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.9])
def test_wicsum_union_all_negative_raw_rows(C, ratio):
    """Raw scores all below zero: Sum < 0, and the crossing can be the first cluster of a bucket whose
    sum is far below Th (its largest prefix is its first product, not its sum). Most scores sit just
    under -1 and one far below, so the top bucket holds most of the (negative) mass."""
    g = torch.Generator().manual_seed(C)
    scores = -(1.0 + 1e-3 * torch.rand(2, 6, C, generator=g))
    scores[..., C // 2] = -100.0
    valid = torch.rand(2, C, generator=g) > 0.1
    counts = torch.randint(1, 50, (2, C), generator=g) * valid
    w = normalize_scores(scores, valid, mode="raw", scale=0.125)
    ref = wicsum_select(w, counts, ratio, valid)
    chosen, taken = ext.wicsum_union(w, counts, valid, ratio, False)
    assert torch.equal(chosen, ref.union() & valid)
    assert torch.equal(taken, ref.taken)


@pytest.mark.parametrize("narrow", [False, True])
def test_cluster_token_ids_equal_table_mask(narrow):
    g = torch.Generator().manual_seed(3)
    tc = torch.randint(0, 12, (3, 200), generator=g)
    chosen = torch.rand(3, 12, generator=g) > 0.5
    paged = PagedIndex(3, "token_cluster", page=64)  # 150 tokens over three pages, the last one partly
    paged.write(0, tc)
    if narrow:  # the two pages below token 150 as int16 offsets, the others int32 (the kernel reads both)
        paged.compact(150)
        assert [p.dtype for p in paged.pages] == [torch.int16, torch.int16, torch.int32, torch.int32]
    ids, offs = ext.cluster_token_ids(chosen, paged.pages, paged.shift, 150)
    for h in range(3):
        want = torch.nonzero(chosen[h][tc[h, :150]]).flatten()
        assert torch.equal(ids[offs[h]:offs[h + 1]], want)


def test_cluster_token_ids_across_work_items():
    """More tokens than one work item (ext.SCAN_CHUNK) per head, pages narrow and wide, a partial last
    page: the items' lists join in token order, none lost or repeated at a boundary."""
    g = torch.Generator().manual_seed(4)
    n = 2 * ext.SCAN_CHUNK + 1000 + 37
    tc = torch.randint(0, 500, (3, n + 100), generator=g)
    chosen = torch.rand(3, 500, generator=g) < torch.tensor([[0.1], [0.5], [0.9]])
    paged = PagedIndex(3, "token_cluster", page=1024)
    paged.write(0, tc)
    paged.compact(ext.SCAN_CHUNK + 5000)  # the pages below as int16 offsets
    ids, offs = ext.cluster_token_ids(chosen, paged.pages, paged.shift, n)
    for h in range(3):
        assert torch.equal(ids[offs[h]:offs[h + 1]], torch.nonzero(chosen[h][tc[h, :n]]).flatten())
    none, offs = ext.cluster_token_ids(torch.zeros(3, 0, dtype=torch.bool), paged.pages, paged.shift, n)
    assert none.numel() == 0 and offs.tolist() == [0, 0, 0, 0]  # no clusters: nothing chosen


@pytest.mark.parametrize("all_past", [False, True])
@pytest.mark.parametrize("block", [13, 400])
def test_plan_reads_equal_python_plan(all_past, block):
    """Read plans over several work items per head (ext.SCAN_CHUNK), with evicted tokens, three tiers
    split by id and a slot map that reorders tokens within blocks (13: frame blocks in cluster order;
    400: spans regrouped by cluster, LayerKV.regroup): slots per head and tier, sorted, their runs and
    the selected counts, against the same plan built in Python."""
    g = torch.Generator().manual_seed(6)
    H, n_past = 3, 2 * ext.SCAN_CHUNK + 3001
    sink, mid_end, d_end, h_end = 40, n_past - 700, ext.SCAN_CHUNK // 2, ext.SCAN_CHUNK + 4000
    # token -> slot: blocks take increasing slots, permuted within
    slot = torch.stack([torch.cat([b * block + torch.randperm(block, generator=g)
                                   for b in range(-(-n_past // block))])[:n_past] for _ in range(H)])
    pos = PagedIndex(H, "pos", page=4096)
    pos.write(0, slot)
    pos.compact(8192)
    evicted = torch.rand(n_past, generator=g) < 0.05
    picks = [torch.nonzero(torch.rand(n_past, generator=g) < p).flatten() for p in (0.2, 0.6, 0.95)]
    packed = PackedSelection.pack(Selection(picks), H)
    got = ext.plan_reads(packed.ids, packed.offs, all_past, n_past, sink, mid_end, pos.pages, pos.shift, H,
                         evicted, True, d_end, h_end)
    for h in range(H):
        mid = torch.arange(sink, mid_end) if all_past else picks[h][(picks[h] >= sink) & (picks[h] < mid_end)]
        taken = torch.cat([torch.arange(sink), mid, torch.arange(mid_end, n_past)])
        taken = taken[~evicted[taken]]
        assert int(got[8][h]) == taken.numel()
        for tier, (a, b) in enumerate([(0, d_end), (d_end, h_end), (h_end, n_past)]):
            want = slot[h, taken[(taken >= a) & (taken < b)]].sort().values
            assert torch.equal(got[2 * tier][got[2 * tier + 1][h]:got[2 * tier + 1][h + 1]], want)
            if tier < 2:
                runs = int((want[1:] - want[:-1] != 1).sum()) + 1 if want.numel() else 0
                assert int(got[6 + tier][h]) == runs


def _filled_store(n_blocks=12, block=7, H=2, D=8, permute=True, **kw):
    g = torch.Generator().manual_seed(5)
    store = KVStore(1, H, D, **kw)
    for _ in range(n_blocks):
        k, v = torch.randn(H, block, D, generator=g), torch.randn(H, block, D, generator=g)
        order = torch.stack([torch.randperm(block, generator=g) for _ in range(H)]) if permute else None
        store.layers[0].append(k, v, order=order)
    return store


@pytest.mark.parametrize("tiers", ["device", "host", "disk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planned_gather_equals_reference_gather(tiers, dtype, tmp_path, monkeypatch):
    """Slots planned in C++ and attended head by head (attend_plan) == the reference gather of the same selection
    (+ always-kept ranges): same attention output, same tokens read, same store counters; with
    per-head selections of different lengths, a host tier, a disk tier read in place through its
    memory maps (its token -> slot pages narrowed to 16-bit offsets), ring slots and bf16 storage."""
    monkeypatch.setattr("vrex.kv.index.PAGE_TOKENS", 16)  # full pages below the disk tier's end within 84 tokens
    H, D, G, T = 2, 8, 3, 4
    block = 7 * H * D * torch.empty(0, dtype=dtype).element_size()  # bytes of one 7-token block, one K or V
    tiers = {"device": {}, "host": {"device_budget_bytes": 3 * 2 * block},
             "disk": {"device_budget_bytes": 3 * 2 * block, "host_budget_bytes": 2 * 2 * block}}[tiers]
    ref_store = _filled_store(H=H, D=D, dtype=dtype, **tiers, **({"disk_dir": tmp_path / "r"} if "host_budget_bytes" in tiers else {}))
    fast_store = _filled_store(H=H, D=D, dtype=dtype, **tiers, **({"disk_dir": tmp_path / "f"} if "host_budget_bytes" in tiers else {}))
    n_past = ref_store.layers[0].length
    g = torch.Generator().manual_seed(9)
    picks = [torch.nonzero(torch.rand(n_past, generator=g) < p).flatten() for p in (0.3, 0.7)]
    sink, recent_start = 3, n_past - 5
    kept = [torch.unique(torch.cat([torch.arange(sink), i[(i >= sink) & (i < recent_start)], torch.arange(recent_start, n_past)]))
            for i in picks]
    q = torch.randn(H * G, T, D, generator=g)
    k_new, v_new = torch.randn(H, T, D, generator=g), torch.randn(H, T, D, generator=g)
    k, v, valid = ref_store.layers[0].gather(kept)
    want = _attention(q, torch.cat([k.float(), k_new], 1), torch.cat([v.float(), v_new], 1), T, valid, 0.3)
    packed = PackedSelection.pack(Selection(picks), H)
    plan = fast_store.layers[0].read_plan(packed.ids, packed.offs, False, n_past, sink, recent_start)
    got = ext.attend_plan(q * 0.3, plan.kbufs, plan.vbufs, plan.slots, plan.offs, k_new, v_new, 0.0, torch.empty(0))
    assert plan.selected == [int(i.numel()) for i in kept]
    torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=FP32_RTOL)
    plan.done()
    assert fast_store.counters() == ref_store.counters()
    if tiers:
        assert fast_store.counters()["fetch_host_bytes"] > 0
    if "host_budget_bytes" in tiers:
        assert fast_store.layers[0].tier_bounds()[0] > 0 and len(plan.kbufs) == 3  # disk, host and device all read
        assert fast_store.layers[0].pos.narrow_pages() > 0
        assert fast_store.counters()["fetch_disk_bytes"] > 0


@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("G,T", [(3, 1), (1, 1), (2, 2), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_attention_equals_gather_then_attention(D, G, T, dtype):
    """Decode attention read in place from the planned slots == the reference gather + attention: per-head
    selections of different lengths (one head reading nothing but the step's own tokens), a host tier and
    ring slots, more slots than one 512-slot work item, bf16 storage, causal rows when T > 1."""
    H = 2
    tiers = {"device_budget_bytes": 300 * 2 * H * D * torch.empty(0, dtype=dtype).element_size()}
    store = _filled_store(n_blocks=160, block=7, H=H, D=D, dtype=dtype, **tiers)
    n_past = store.layers[0].length
    g = torch.Generator().manual_seed(D + G + T)
    picks = [torch.nonzero(torch.rand(n_past, generator=g) < 0.6).flatten(), torch.zeros(0, dtype=torch.int64)]
    q = 3 * torch.randn(H * G, T, D, generator=g)  # large logits: the online softmax must rescale
    k_new, v_new = torch.randn(H, T, D, generator=g), torch.randn(H, T, D, generator=g)
    k, v, valid = store.layers[0].gather(picks)
    want = _attention(q, torch.cat([k.float(), k_new], 1), torch.cat([v.float(), v_new], 1), T, valid, 0.125)
    packed = PackedSelection.pack(Selection(picks), H)
    plan = store.layers[0].read_plan(packed.ids, packed.offs, False, n_past, 0, n_past)
    assert plan.selected[0] > 512 and plan.selected[1] == 0 and plan.slots[0].numel() > 0  # host and device tiers
    got = ext.attend_slots(q * 0.125, plan.kbufs, plan.vbufs, plan.slots, plan.offs, k_new, v_new)
    torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=FP32_RTOL)



def test_plan_attention_is_the_same_on_one_thread_and_two():
    """attend_plan cuts the work into blocks by its size alone, so a row's partials and their merge are
    the same whatever the thread count: bit for bit (ReSV's later choices must not depend on the machine)."""
    H, D, G, T = 3, 64, 3, 13
    store = _filled_store(n_blocks=400, block=12, H=H, D=D, dtype=torch.float32)
    n_past = store.layers[0].length
    g = torch.Generator().manual_seed(7)
    picks = [torch.nonzero(torch.rand(n_past, generator=g) < p).flatten() for p in (0.7, 0.4, 0.2)]
    packed = PackedSelection.pack(Selection(picks), H)
    plan = store.layers[0].read_plan(packed.ids, packed.offs, False, n_past, 0, n_past)
    q = torch.randn(H * G, T, D, generator=g)
    k_new, v_new = torch.randn(H, T, D, generator=g), torch.randn(H, T, D, generator=g)
    outs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(ext.attend_plan(q * 0.125, plan.kbufs, plan.vbufs, plan.slots, plan.offs, k_new, v_new, 0.0,
                                        torch.empty(0), ext.ATTEND_COL_BLOCK))
    finally:
        torch.set_num_threads(before)
    assert sum(plan.selected) + H * T > 2 * ext.ATTEND_MIN_BLOCK  # several blocks, so several items
    assert torch.equal(outs[0], outs[1])

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("G,T,D", [(3, 13, 16), (3, 13, 64), (1, 5, 16), (2, 1, 128), (3, 40, 16), (3, 40, 40)])
@pytest.mark.parametrize("cols", [None, 23])
def test_plan_attention_equals_gather_then_attention(dtype, softcap, G, T, D, cols):
    """Frame-step attention over the planned slots, head by head with no padding (attend_plan) == the
    reference gather + attention: heads reading 60%, 10% and nothing of the past, a host tier and ring
    slots, bf16 storage, soft-capping, causal rows, more query rows than one score block (a
    fast-forwarded chunk); the workspace grows once, is reused, and holds scores for one block of rows.
    ``cols`` 23: the key rows go in blocks of 23 with the online softmax (blocks across tiers, across
    the past/new boundary, and, at T = 40, blocks of the step's later tokens that early rows do not see);
    the workspace then holds one block, whatever the head reads. Head sizes: 16, 64 and 128 (the
    kernel's vector paths) and 40 (its any-size path)."""
    cols = ext.ATTEND_COL_BLOCK if cols is None else cols
    H = 3
    tiers = {"device_budget_bytes": 300 * 2 * H * D * torch.empty(0, dtype=dtype).element_size()}
    store = _filled_store(n_blocks=120, block=7, H=H, D=D, dtype=dtype, **tiers)
    n_past = store.layers[0].length
    g = torch.Generator().manual_seed(G * 100 + T)
    picks = [torch.nonzero(torch.rand(n_past, generator=g) < p).flatten() for p in (0.6, 0.1)] + [torch.zeros(0, dtype=torch.int64)]
    packed = PackedSelection.pack(Selection(picks), H)
    plan = store.layers[0].read_plan(packed.ids, packed.offs, False, n_past, 0, n_past)
    assert plan.slots[0].numel() > 0 and plan.slots[1].numel() > 0  # host and device tiers
    k, v, valid = store.layers[0].gather(picks)
    ws = torch.empty(0)
    for step in range(2):
        q = 3 * torch.randn(H * G, T, D, generator=g)
        k_new, v_new = torch.randn(H, T, D, generator=g), torch.randn(H, T, D, generator=g)
        want = _attention(q, torch.cat([k.float(), k_new], 1), torch.cat([v.float(), v_new], 1), T, valid, 0.125, softcap)
        got = ext.attend_plan(q * 0.125, plan.kbufs, plan.vbufs, plan.slots, plan.offs, k_new, v_new, softcap or 0.0, ws, cols)
        torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=FP32_RTOL)
        if step == 0:
            grown = ws.data_ptr()
            # one workspace per thread: the scores of one group of rows (ATTEND_ROW_BLOCK) over one block
            # of keys (the work over ATTEND_ITEMS, at least ATTEND_MIN_BLOCK, at most cols), ATTEND_KEY_SUB
            # key and value rows, and the group's queries and output
            rows, work, threads = ext.ATTEND_ROW_BLOCK, sum(plan.selected) + H * T, torch.get_num_threads()
            keys = min(cols, max(ext.ATTEND_MIN_BLOCK, -(-work // ext.ATTEND_ITEMS)))
            items = sum(-(-(n + T) // keys) for n in plan.selected)
            per = (rows * keys + 2 * D * ext.ATTEND_KEY_SUB + 2 * rows * D) * min(threads, items)
            assert per <= ws.numel() <= 1.25 * per + 1
    assert ws.data_ptr() == grown  # the second step reused the workspace


def test_attention_masks_against_dense_reference():
    """The column-limited masks (padding on the past, causality on the step's tokens) == a dense
    masked softmax written out in full."""
    g = torch.Generator().manual_seed(2)
    H, G, T, L, D = 2, 3, 5, 9, 8
    q, k, v = torch.randn(H * G, T, D, generator=g), torch.randn(H, L + T, D, generator=g), torch.randn(H, L + T, D, generator=g)
    valid = torch.arange(L)[None] < torch.tensor([[6], [9]])
    got = _attention(q, k, v, T, valid, 0.5)
    for hq in range(H * G):
        h = hq // G
        for i in range(T):
            allowed = torch.cat([valid[h], torch.arange(T) <= i])
            s = (k[h] @ q[hq, i]) * 0.5
            p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
            torch.testing.assert_close(got[hq, i], p @ v[h], atol=1e-5, rtol=1e-4)


def _three_tier_store(dtype, tmp_path, H: int, D: int) -> KVStore:
    """150 blocks of 7 tokens over device (20 blocks), host (20) and disk: more disk slots than one work item."""
    block = 7 * H * D * torch.empty(0, dtype=dtype).element_size()
    store = _filled_store(n_blocks=150, H=H, D=D, dtype=dtype, device_budget_bytes=20 * 2 * block,
                          host_budget_bytes=20 * 2 * block, disk_dir=tmp_path)
    assert store.layers[0].tier_bounds()[0] > 512
    return store


def _reference_and_plan(store: KVStore, g: torch.Generator, G: int, T: int):
    """Two heads reading 50% and 90% of the past: the reference gather + attention of ``T`` random query rows
    per query head (``G`` per KV head), the fast path's plan of the same selection, and (q, k_new, v_new)."""
    n_past, H, D = store.layers[0].length, store.num_kv_heads, store.head_dim
    picks = [torch.nonzero(torch.rand(n_past, generator=g) < p).flatten() for p in (0.5, 0.9)]
    k, v, valid = store.layers[0].gather(picks)
    q = 3 * torch.randn(H * G, T, D, generator=g)
    k_new, v_new = torch.randn(H, T, D, generator=g), torch.randn(H, T, D, generator=g)
    want = _attention(q, torch.cat([k.float(), k_new], 1), torch.cat([v.float(), v_new], 1), T, valid, 0.125)
    packed = PackedSelection.pack(Selection(picks), H)
    return want, store.layers[0].read_plan(packed.ids, packed.offs, False, n_past, 0, n_past), (q, k_new, v_new)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_attention_reads_the_disk_tier_in_place(dtype, tmp_path):
    """Decode attention over a plan whose oldest slots are on the disk tier (the kernel reads the memory
    maps through a transposed [H, cap, D] view, no copy) == the reference gather + attention; the pages
    it touched are released after."""
    H, D, G, T = 2, 64, 3, 1
    store = _three_tier_store(dtype, tmp_path, H, D)
    want, plan, (q, k_new, v_new) = _reference_and_plan(store, torch.Generator().manual_seed(4), G, T)
    assert plan.disk is not None and plan.kbufs[0].stride(1) == H * D  # the map itself, token-major
    got = ext.attend_slots(q * 0.125, plan.kbufs, plan.vbufs, plan.slots, plan.offs, k_new, v_new)
    plan.done()
    assert plan.disk._touched == 0
    torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["half", "pairs"])
@pytest.mark.parametrize("T", [1, 13])
def test_attention_turns_the_disk_keys_that_owe_a_move(dtype, layout, T, tmp_path):
    """After two position re-indexes the disk tier's keys still sit where they were written and owe their
    moves (vrex.kv.store._Disk); decode (attend_slots, T = 1) and frame-step (attend_plan) attention turn
    them as they read == the reference gather (turned in PyTorch) + attention. Partial rotary width (48 of
    64 dims), a host and a device tier beside the disk."""
    from vrex.kv.layers import LayerSpec, rotation

    G = 3
    store = _three_tier_store(dtype, tmp_path, 2, 64)
    n_past = store.layers[0].length
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 48, 2).float() / 48))
    rope = LayerSpec(0, inv_freq=inv_freq, rope_layout=layout)
    g = torch.Generator().manual_seed(9)
    for _ in range(2):
        moves = -torch.randint(0, 3000, (n_past,), generator=g)
        store.layers[0].rotate_keys(*rotation(moves, inv_freq, layout), layout == "half", moves=moves, rope=rope)
    want, plan, (q, k_new, v_new) = _reference_and_plan(store, g, G, T)
    assert plan.disk is not None and plan.turn_args["turn"][0].any()  # the disk keys owe their moves
    if T == 1:
        got = ext.attend_slots(q * 0.125, plan.kbufs, plan.vbufs, plan.slots, plan.offs, k_new, v_new, **plan.turn_args)
    else:
        got = ext.attend_plan(q * 0.125, plan.kbufs, plan.vbufs, plan.slots, plan.offs, k_new, v_new, 0.0, torch.empty(0),
                              **plan.turn_args)
    plan.done()
    torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=FP32_RTOL)


class _CheckedReSV(ReSVPolicy):
    """ReSV whose every reference selection is compared with the fused one on the same inputs."""

    calls = 0

    def select(self, layer, queries, n_past, stage):
        ref = super().select(layer, queries, n_past, stage)
        fast = self.select_packed(layer, queries, n_past, stage, want_stats=True).unpack()
        for a, b in zip(ref.indices, fast.indices):
            assert torch.equal(a, b), f"layer {layer}: fused selection differs from the reference"
        for key in ("selected", "clusters", "clusters_selected", "scanned", "comparisons", "hc_bytes"):
            assert fast.stats[key] == ref.stats[key], key
        type(self).calls += 1
        return ref


@pytest.fixture(scope="module")
def filled(videollm):
    from vrex.bench.media import long_stream
    from vrex.engine.session import SessionConfig, StreamingSession

    frames = long_stream(40)
    feats = videollm.encode_frames([im for _, im in frames[:34]])
    base = StreamingSession(videollm, make_policy("full"), SessionConfig(theta=0.0, kernels="reference"))
    base.fast_forward([t for t, _ in frames[:34]], feats)
    return base, frames[34:]


@pytest.mark.parametrize("params", [{}, {"score_norm": "softmax", "ratio": 0.95, "hamming_threshold": 4, "sort_by": "weighted"},
                                    {"max_tokens": 100}])
def test_resv_fused_selection_identical_on_real_keys(filled, params):
    from vrex.engine.session import SessionConfig

    base, frames = filled
    _CheckedReSV.calls = 0
    s = base.fork(_CheckedReSV(**params), SessionConfig(theta=0.0, kernels="reference", recent_tokens=0))
    for t, im in frames[:2]:
        s.push_frame(t, im)
    s.feed(torch.tensor([5, 6, 7]), "text")
    s.feed(torch.tensor([8]), "decode")
    assert _CheckedReSV.calls == 4 * s.store.num_layers


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("tiers", ["device", "host", "disk"])
def test_session_fast_equals_reference(filled, name, tiers, tmp_path):
    """Same frames and text through both kernel sets: same logits (float tolerance), same greedy
    tokens, same tokens read and the same bytes and transfers counted by the store; everything on the
    device, a 64-token device tier over the host, or over a small host tier and the disk."""
    _fast_equals_reference(filled, name, tiers, tmp_path)


@pytest.mark.parametrize("name", ["full", "flexgen", "resv"])
def test_session_fast_equals_reference_in_key_blocks(filled, name, tmp_path, monkeypatch):
    """The same with frame and text steps attended 100 key rows at a time (the online softmax that keeps
    the fast path's workspace bounded over long streams; by default a block holds 8192 rows)."""
    import vrex.kv.cache

    monkeypatch.setattr(vrex.kv.cache, "ATTEND_COLUMNS", 100)
    _fast_equals_reference(filled, name, "disk", tmp_path)


@pytest.mark.parametrize("name", ["flexgen", "rekv", "resv"])
def test_session_fast_equals_reference_across_reindexing_on_disk(filled, name, tmp_path):
    """The same with positions re-indexed during the steps (a 430-position window: the forks start at
    ~420 tokens) while most of the past is on disk: the disk keys owe their moves, the fast path's kernels
    turn them as they read and the reference turns them in PyTorch; the key files are not rewritten."""
    from vrex.engine.positions import PositionConfig

    _fast_equals_reference(filled, name, "disk", tmp_path, positions=PositionConfig(max_position=430, spread=1))


def _fast_equals_reference(filled, name, tiers, tmp_path, positions=None):
    from vrex.engine.session import SessionConfig

    base, frames = filled
    device_tokens = None if tiers == "device" else 64
    out = {}
    for kernels in ("reference", "fast"):
        extra = {"device_tokens": device_tokens} if device_tokens else {}
        if positions is not None:
            extra["positions"] = positions
        if tiers == "disk":  # 100 tokens per layer on the host, the older ones on disk
            extra.update(host_budget_bytes=100 * base.store.token_bytes_all_heads * base.store.num_layers,
                         disk_dir=str(tmp_path / kernels))
        cfg = SessionConfig(theta=0.0, kernels=kernels, **extra)
        s = base.fork(make_policy(name), cfg)
        logits, sel = [], []
        for t, im in frames[:3]:
            ev = s.push_frame(t, im)[0]
            logits.append(s.last_logits)
            sel.append(ev.stats.get("selected_ratio"))
        logits.append(s.feed(torch.tensor([11, 12, 13]), "text")[-1])
        logits.append(s.feed(torch.tensor([14]), "decode")[-1])
        out[kernels] = (torch.stack(logits), sel, s.store.counters())
        if positions is not None:  # it re-indexed, and the disk keys owe the moves
            assert int(s.positions.max()) < positions.max_position < s.cached_tokens
            assert s.store.layers[0].disk.owed is not None and bool(s.store.layers[0].disk.owed.any())
        if device_tokens and POLICIES[name].offloads:
            assert s.store.counters()["fetch_host_bytes"] > 0  # the host tier is really read
            if tiers == "disk":
                assert s.store.counters()["fetch_disk_bytes"] > 0  # and the disk tier
    (ref, ref_sel, ref_c), (got, got_sel, got_c) = out["reference"], out["fast"]
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=1e-3)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    if name != "streamingllm":  # the reference counts evicted ids it then skips; the fast path does not
        assert got_sel == pytest.approx(ref_sel)
        if name in ("full", "flexgen"):
            # reading everything, the reference stores the step's block first (which may push an older
            # block from device to host) and reads back; the fast path reads first: the same bytes in all
            read = ("device_read_bytes", "fetch_host_bytes", "fetch_disk_bytes")
            assert sum(got_c[k] for k in read) == sum(ref_c[k] for k in read)
            got_c, ref_c = ({k: v for k, v in c.items() if k not in read} for c in (got_c, ref_c))
        assert got_c == ref_c


def test_resv_blocks_written_in_cluster_order(filled):
    """The store holds each block in ReSV's cluster order (written once) and so fetches selected
    clusters in fewer transfers than arrival order would (the KV memory unit's point)."""
    from vrex.engine.session import SessionConfig

    class ArrivalOrder(ReSVPolicy):
        block_order = None

    base, frames = filled
    transfers = {}
    for policy in (make_policy("resv"), ArrivalOrder()):
        s = base.fork(policy, SessionConfig(theta=0.0, device_tokens=64, recent_tokens=0))
        before = s.store.counters()["fetch_host_transfers"]
        for t, im in frames[:3]:
            s.push_frame(t, im)
        transfers[type(policy).__name__] = s.store.counters()["fetch_host_transfers"] - before
        if policy.block_order is not None:
            layer, start, n = 3, s.spans[-1][0], s.spans[-1][1]
            order = policy.block_order(layer, start, n)
            pos = s.store.layers[layer].pos.read(start, start + n)
            assert torch.equal(pos.gather(1, order) - pos.min(1, keepdim=True).values, torch.arange(n).expand_as(order))
    assert transfers["ReSVPolicy"] < transfers["ArrivalOrder"]


def test_resv_regroups_spans_of_frames_by_cluster(filled):
    """Every ``regroup_tokens`` stored tokens ReSV's cache rewrites the blocks since the last time as one
    block in cluster order (LayerKV.regroup), so a cluster that collected tokens over many frames is one
    run: the same tokens read and the same logits as per-frame blocks, fewer host transfers."""
    from vrex.engine.session import SessionConfig

    base, frames = filled
    out = {}
    for span in (64, None):
        policy = make_policy(f"resv[regroup_tokens={span}]")
        s = base.fork(policy, SessionConfig(theta=0.0, device_tokens=200, recent_tokens=0))
        before = s.store.counters()["fetch_host_transfers"]
        logits, sel = [], []
        for t, im in frames[:3]:
            sel.append(s.push_frame(t, im)[0].stats.get("selected_ratio"))
            logits.append(s.last_logits)
        logits.append(s.feed(torch.tensor([14]), "decode")[-1])
        out[span] = (torch.stack(logits), sel, s.store.counters()["fetch_host_transfers"] - before)
        if span is not None:  # each merged block holds its tokens in the table's cluster order, across frames
            L = s.store.layers[3]
            merged = [b for tier in L.blocks.values() for b in tier if b.length >= span]
            assert len(merged) >= 4 and sum(b.length for b in merged) >= 0.7 * s.cached_tokens
            for b in merged:
                order = policy.block_order(3, b.start, b.length)
                pos = L.pos.read(b.start, b.start + b.length)
                assert torch.equal(pos.gather(1, order) - b.p0, torch.arange(b.length).expand_as(order))
    (got, got_sel, got_t), (ref, ref_sel, ref_t) = out[64], out[None]
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=1e-3)
    assert got_sel == pytest.approx(ref_sel)
    assert got_t < ref_t
