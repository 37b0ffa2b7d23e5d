"""Position re-indexing in place (``KVStore.rotate_keys``, the fast path) against the reference
(``set_keys(rerotate(keys(layer)))``): the same stored keys in every tier, whatever the layout,
rotary width, store type, block order and evictions."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from vrex.kv.layers import HALF, PAIRS, LayerSpec, rerotate, rotation
from vrex.kv.store import KVStore

H, D = 2, 8


def _twin_stores(tmp_path_factory, dtype, seed, blocks, evict, dev_tokens, host_tokens):
    """Two stores filled alike (the same appends, block orders and evictions), spread over device,
    host and disk by the budgets."""
    g = torch.Generator().manual_seed(seed)
    tb = 2 * D * H * torch.empty(0, dtype=dtype).element_size()
    stores = [KVStore(1, H, D, dtype=dtype, device_budget_bytes=dev_tokens * tb, host_budget_bytes=host_tokens * tb,
                      disk_dir=tmp_path_factory.mktemp("kv")) for _ in range(2)]
    for n, permuted in blocks:
        k, v = 3 * torch.randn(H, n, D, generator=g), torch.randn(H, n, D, generator=g)
        order = torch.stack([torch.randperm(n, generator=g) for _ in range(H)]) if permuted else None
        for s in stores:
            s.layers[0].append(k, v, order=order)
    n = stores[0].layers[0].length
    if evict and n > 2:
        ids = torch.arange(1, n, 3)
        for s in stores:
            s.layers[0].evict(ids)
    return stores


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16]), layout=st.sampled_from([HALF, PAIRS]),
       rot=st.sampled_from([4, 8]), seed=st.integers(0, 10_000),
       blocks=st.lists(st.tuples(st.integers(1, 9), st.booleans()), min_size=1, max_size=8),
       evict=st.booleans(), dev_tokens=st.sampled_from([0, 3, 40]), host_tokens=st.sampled_from([0, 5, 40]))
def test_rotate_keys_in_place_equals_the_reference(tmp_path_factory, dtype, layout, rot, seed, blocks, evict,
                                                   dev_tokens, host_tokens):
    fast, ref = _twin_stores(tmp_path_factory, dtype, seed, blocks, evict, dev_tokens, host_tokens)
    n = ref.layers[0].length
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    rope = LayerSpec(0, inv_freq=inv_freq, rope_layout=layout)
    delta = torch.randint(-5000, 0, (n,), generator=torch.Generator().manual_seed(seed))
    trig = rotation(delta, inv_freq, layout)
    before = ref.layers[0].keys()

    want = rerotate(ref.layers[0].keys(), delta, inv_freq, layout, trig=trig)
    ref.layers[0].set_keys(want, moves=delta, rope=rope)
    got = torch.full((1,), 7.0)  # a scratch of the wrong size and stale contents: resized and overwritten
    fast.layers[0].rotate_keys(*trig, layout == HALF, got, moves=delta, rope=rope)

    live = torch.arange(n)[~fast.layers[0].evicted[:n]]
    stored_fast, stored_ref = fast.layers[0].keys(), ref.layers[0].keys()
    # float32 math on both sides, rounded once into the store's type: equal up to float32 rounding of
    # the two products (they may fuse differently) and then one step of the store's type
    scale = before.float().abs().amax(-1, keepdim=True)
    tol = 8 * torch.finfo(torch.float32).eps * scale + torch.finfo(dtype).eps * stored_ref.float().abs()
    assert ((stored_fast.float() - stored_ref.float()).abs() <= tol).all()
    # what the store holds, handed to the policy: the very values on the device and host tiers; on disk the
    # kernel's turn of each key against the reference's (keys owe their move there: vrex.kv.store._Disk)
    d_end = fast.layers[0].tier_bounds()[0]
    in_place = live[live >= d_end]
    assert torch.equal(got[:, in_place], stored_fast[:, in_place].float())
    assert ((got[:, live] - stored_fast[:, live].float()).abs() <= tol[:, live]).all()
    assert (got[:, ~torch.isin(torch.arange(n), live)] == 0).all()
    if rot < D:  # dims past the rotary width pass through untouched
        assert torch.equal(stored_fast[..., rot:], before[..., rot:])
    # values are never touched
    assert torch.equal(fast.layers[0].values(), ref.layers[0].values())
    for s in (fast, ref):
        s.close()


def test_rotate_keys_reaches_every_tier(tmp_path_factory):
    """A store spread over all three tiers: each tier's keys move (a wrong tier loop would leave some)."""
    fast, ref = _twin_stores(tmp_path_factory, torch.bfloat16, 0, [(6, True)] * 5, False, 6, 8)
    d_end, h_end, n = fast.layers[0].tier_bounds()
    assert 0 < d_end < h_end < n
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    rope = LayerSpec(0, inv_freq=inv_freq, rope_layout=HALF)
    moves = torch.full((n,), -700)
    trig = rotation(moves, inv_freq, HALF)
    before = fast.layers[0].keys()
    fast.layers[0].rotate_keys(*trig, True, moves=moves, rope=rope)
    after = fast.layers[0].keys()
    for a, b in ((0, d_end), (d_end, h_end), (h_end, n)):
        assert not torch.equal(after[:, a:b], before[:, a:b])
    ref.layers[0].set_keys(rerotate(ref.layers[0].keys(), moves, inv_freq, HALF), moves=moves, rope=rope)
    torch.testing.assert_close(after.float(), ref.layers[0].keys().float(), atol=0, rtol=2 ** -7)
    for s in (fast, ref):
        s.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("most", [4000, 20000])
def test_a_move_leaves_the_disk_files_unwritten_and_moves_add_up(tmp_path_factory, dtype, most):
    """The disk tier is not rewritten by a re-index: its key file's bytes stay as written, while its keys
    read as moved (they owe the move, ``vrex.kv.store._Disk``); three moves in a row read as one move by
    their sum (the table of turns grows with the range), within one rounding of the store's type, where
    rotating in place would have rounded three times. Moves of up to 20000 positions pass int16: the
    record widens to int32."""
    fast, ref = _twin_stores(tmp_path_factory, dtype, 1, [(6, True)] * 8, True, 6, 8)
    d_end, _, n = fast.layers[0].tier_bounds()
    assert d_end > 0
    key_file = fast.layers[0].disk.paths[0]
    written = key_file.read_bytes()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    rope = LayerSpec(0, inv_freq=inv_freq, rope_layout=HALF)
    before = ref.layers[0].keys()
    g = torch.Generator().manual_seed(3)
    total = torch.zeros(n, dtype=torch.int64)
    for _ in range(3):
        moves = -torch.randint(0, most, (n,), generator=g)
        fast.layers[0].rotate_keys(*rotation(moves, inv_freq, HALF), True, moves=moves, rope=rope)
        total += moves
    assert key_file.read_bytes() == written
    assert fast.layers[0].disk.owed.dtype == (torch.int16 if 3 * most < 2 ** 15 else torch.int32)
    want = rerotate(before, total, inv_freq, HALF)  # one rounding
    live = torch.arange(n)[~fast.layers[0].evicted[:n]]
    disk = live[live < d_end]
    got = fast.layers[0].keys()
    tol = 16 * torch.finfo(torch.float32).eps * before.float().abs().amax(-1, keepdim=True) \
        + torch.finfo(dtype).eps * want.float().abs()
    assert ((got[:, disk].float() - want[:, disk].float()).abs() <= tol[:, disk]).all()
    assert not torch.equal(got[:, disk], before[:, disk])
    for s in (fast, ref):
        s.close()


def test_what_disk_keys_owe_stays_within_the_positions_however_many_re_indexes(tmp_path_factory):
    """Twelve re-indexes, each moving another twelfth of the tokens by 4000 positions (the newest ones,
    as vrex.engine.positions squeezes the past) and the rest by a few: a key owes its position now minus
    the one it was written at, at most about 4000 here, so the record stays int16 and the table of turns
    holds about 4K rows (a bound summed over the re-indexes' largest moves would reach 48K)."""
    fast, twin = _twin_stores(tmp_path_factory, torch.bfloat16, 2, [(6, True)] * 30, False, 6, 8)
    n = fast.layers[0].length
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    rope = LayerSpec(0, inv_freq=inv_freq, rope_layout=HALF)
    ids = torch.arange(n)
    for i in range(12):
        moves = torch.where(ids % 12 == i, -4000, -(ids % 7))
        fast.layers[0].rotate_keys(*rotation(moves, inv_freq, HALF), True, moves=moves, rope=rope)
    disk = fast.layers[0].disk
    lo, packed = fast._turn_tables.get(disk.rope)
    assert disk.owed.dtype == torch.int16
    assert packed.shape[0] <= 4000 + 12 * 6 + 1
    for s in (fast, twin):
        s.close()


def test_a_disk_tier_move_needs_the_moves_and_the_rope(tmp_path_factory):
    fast, ref = _twin_stores(tmp_path_factory, torch.float32, 0, [(6, False)] * 5, False, 6, 8)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    n = fast.layers[0].length
    with pytest.raises(ValueError, match="disk tier holds keys"):
        fast.layers[0].rotate_keys(*rotation(torch.full((n,), -5), inv_freq, HALF), True)
    for s in (fast, ref):
        s.close()


@pytest.mark.parametrize("layout", [HALF, PAIRS])
def test_pending_rotations_grow_past_their_headroom_and_equal_one_rotation(layout):
    """A spread re-index keeps its rotations across steps (``vrex.kv.cache._Rotations``): rows of the tokens
    it began with by ``delta``, rows appended since by ``-shift``, through steps small and larger than the
    buffers' headroom; every prefix equals the rotation of the whole move computed at once."""
    from vrex.kv.cache import _Rotations

    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    delta, shift = -torch.arange(50) // 3, 7
    rot = _Rotations(delta, shift, inv_freq, layout)
    for n in (50, 51, 60, 3000, 3001, 9000):  # 3000 and 9000 pass the buffers' room (50 + 1024, then more)
        cos, sin = rot.upto(n)
        full = torch.cat([delta, torch.full((n - 50,), -shift)])
        want_cos, want_sin = rotation(full, inv_freq, layout)
        assert cos.is_contiguous() and torch.equal(cos, want_cos) and torch.equal(sin, want_sin), n
