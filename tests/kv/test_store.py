import errno
import os
from collections import deque

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import vrex.kv.store as store_mod
from vrex.kv.store import KVStore, KVStoreDiskError

H, D, NL = 2, 4, 2


class Shadow:
    """The obvious model: every K/V in arrival order plus the evicted set."""

    def __init__(self):
        self.k = torch.zeros(H, 0, D)
        self.v = torch.zeros(H, 0, D)
        self.evicted = set()

    def append(self, k, v):
        self.k = torch.cat([self.k, k], 1)
        self.v = torch.cat([self.v, v], 1)

    def live(self):
        return torch.tensor([i for i in range(self.k.shape[1]) if i not in self.evicted], dtype=torch.int64)


def token_bytes(dtype=torch.float32):
    return 2 * D * torch.empty(0, dtype=dtype).element_size()


ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 7), st.booleans()),
        st.tuples(st.just("evict"), st.integers(0, 60), st.integers(1, 8)),
        st.tuples(st.just("gather"), st.integers(0, 10_000), st.just(0)),
        st.tuples(st.just("rekey"), st.just(0), st.just(0)),
        st.tuples(st.just("regroup"), st.integers(0, 10), st.integers(0, 1000)),
    ),
    min_size=1, max_size=25,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, dev_tokens=st.sampled_from([None, 0, 3, 8]), host_tokens=st.sampled_from([None, 2, 6, 20]),
       seed=st.integers(0, 1000))
def test_store_matches_shadow(tmp_path_factory, ops, dev_tokens, host_tokens, seed):
    g = torch.Generator().manual_seed(seed)
    per_tok_all = token_bytes() * H * NL
    disk = tmp_path_factory.mktemp("kv") if host_tokens is not None else None
    s = KVStore(NL, H, D, device_budget_bytes=None if dev_tokens is None else dev_tokens * per_tok_all,
                host_budget_bytes=None if host_tokens is None else host_tokens * per_tok_all, disk_dir=disk)
    sh = [Shadow() for _ in range(NL)]
    starts = []  # first id of every block appended (regroup spans start on one)
    for op, a, b in ops:
        if op == "append":
            starts.append(s.layers[0].length)
            for layer in range(NL):
                k, v = torch.randn(H, a, D, generator=g), torch.randn(H, a, D, generator=g)
                start = s.layers[layer].append(k, v)
                assert start == sh[layer].k.shape[1]
                sh[layer].append(k, v)
                if b:
                    order = torch.stack([torch.randperm(a, generator=g) for _ in range(H)])
                    s.layers[layer].set_block_order(start, order)
        elif op == "evict":
            n = s.layers[0].length
            if n:
                ids = torch.arange(a % n, min(n, a % n + b))
                for layer in range(NL):
                    s.layers[layer].evict(ids)
                    sh[layer].evicted |= set(ids.tolist())
        elif op == "regroup":  # blocks from the a-th last on, merged into any order (tiers, evictions skipped)
            L0 = s.layers[0]  # blocks merged by an earlier regroup no longer start where they were appended
            starts = [x for x in starts if x < L0.d_end or any(blk.start == x for t in L0.blocks.values() for blk in t)]
            if starts:
                first = starts[-1 - a % len(starts)]
                gg = torch.Generator().manual_seed(b)
                for layer in range(NL):
                    s.layers[layer].regroup(first, s.layers[layer].length,
                              lambda x, y: torch.stack([torch.randperm(y - x, generator=gg) for _ in range(H)]))
        elif op == "rekey":
            for layer in range(NL):
                if s.layers[layer].length:
                    new = torch.randn(H, s.layers[layer].length, D, generator=g)
                    s.layers[layer].set_keys(new)
                    sh[layer].k = new.clone()
        else:
            n = s.layers[0].length
            if n == 0:
                continue
            gg = torch.Generator().manual_seed(a)
            idx = [torch.nonzero(torch.rand(n, generator=gg) < 0.5).flatten() for _ in range(H)]
            for layer in range(NL):
                before = s.counters()
                k, v, valid = s.layers[layer].gather(idx)
                after = s.counters()
                d_end, h_end, _ = s.layers[layer].tier_bounds()
                exp_host = exp_disk = exp_dev = 0
                for h in range(H):
                    want = torch.tensor([i for i in idx[h].tolist() if i not in sh[layer].evicted], dtype=torch.int64)
                    m = want.numel()
                    assert torch.equal(k[h, :m], sh[layer].k[h, want])
                    assert torch.equal(v[h, :m], sh[layer].v[h, want])
                    if valid is not None:
                        assert valid[h].sum() == m and valid[h, :m].all()
                    exp_disk += int((want < d_end).sum())
                    exp_host += int(((want >= d_end) & (want < h_end)).sum())
                    exp_dev += int((want >= h_end).sum())
                tb = token_bytes()
                assert after["fetch_disk_bytes"] - before["fetch_disk_bytes"] == exp_disk * tb
                assert after["fetch_host_bytes"] - before["fetch_host_bytes"] == exp_host * tb
                assert after["device_read_bytes"] - before["device_read_bytes"] == exp_dev * tb
                if exp_host:
                    assert after["fetch_host_transfers"] > before["fetch_host_transfers"]
        # invariants after every op
        res = s.resident_bytes()
        live_total = sum(sh[layer].live().numel() for layer in range(NL))
        assert sum(res.values()) == live_total * token_bytes() * H
        if dev_tokens is not None:
            assert res["device"] <= dev_tokens * per_tok_all
        if host_tokens is not None:
            assert res["host"] <= host_tokens * per_tok_all
        for layer in range(NL):
            live = sh[layer].live()
            k, v, valid = s.layers[layer].gather(None)
            assert valid is None
            assert torch.equal(k, sh[layer].k[:, live]) and torch.equal(v, sh[layer].v[:, live])
            keys = s.layers[layer].keys()
            assert torch.equal(keys[:, live], sh[layer].k[:, live])
    s.close()


def test_full_fast_path_is_a_view_and_amortised():
    s = KVStore(1, H, D)
    for i in range(100):
        s.layers[0].append(torch.full((H, 1, D), float(i)), torch.zeros(H, 1, D))
    k, v, m = s.layers[0].gather(None)
    assert m is None and k.shape == (H, 100, D) and torch.equal(k[0, :, 0], torch.arange(100.0))
    assert k.data_ptr() == s.layers[0].dev.k.data_ptr()  # no copy
    assert s.layers[0].dev.cap == 128  # capacity doubling, not one cat per step
    c = s.counters()
    assert c["fetch_host_bytes"] == c["fetch_disk_bytes"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_roundtrip_exact_through_every_tier(tmp_path, dtype):
    tb = 2 * D * torch.empty(0, dtype=dtype).element_size() * H
    s = KVStore(1, H, D, dtype=dtype, device_budget_bytes=4 * tb, host_budget_bytes=4 * tb, disk_dir=tmp_path)
    k = torch.randn(H, 20, D).to(dtype)
    v = torch.randn(H, 20, D).to(dtype)
    for i in range(0, 20, 2):
        s.layers[0].append(k[:, i : i + 2], v[:, i : i + 2])
    d_end, h_end, n = s.layers[0].tier_bounds()
    assert 0 < d_end < h_end < n == 20  # all three tiers used
    assert s.resident_bytes() == {"device": 4 * tb, "host": 4 * tb, "disk": 12 * tb}
    kk, vv, _ = s.layers[0].gather(None)
    assert torch.equal(kk.view(torch.int16), k.view(torch.int16)) if dtype != torch.float32 else torch.equal(kk, k)
    assert torch.equal(vv, v)
    assert any(p.stat().st_size > 0 for p in tmp_path.rglob("*.bin"))
    c = s.counters()
    e = 2 * D * torch.empty(0, dtype=dtype).element_size()
    assert c["offload_device_host_bytes"] == 16 * H * e and c["offload_host_disk_bytes"] == 12 * H * e
    assert c["fetch_disk_bytes"] == 12 * H * e and c["fetch_host_bytes"] == 4 * H * e
    # one transfer per head per tier (each tier holds one contiguous run)
    assert c["fetch_disk_transfers"] == H and c["fetch_host_transfers"] == H


def test_counters_transfers_and_cluster_contiguous_layout():
    tb = token_bytes() * H
    s = KVStore(1, H, D, device_budget_bytes=0)  # everything offloaded to host
    T = 8
    s.layers[0].append(torch.randn(H, T, D), torch.randn(H, T, D))
    s.layers[0].append(torch.randn(H, T, D), torch.randn(H, T, D))
    # a "cluster" made of the even tokens of block 2
    cluster = torch.arange(T, 2 * T, 2)
    before = s.counters()["fetch_host_transfers"]
    s.layers[0].gather([cluster] * H)
    scattered = s.counters()["fetch_host_transfers"] - before
    assert scattered == 4 * H  # 4 separate runs per head
    # the same cluster with a cluster-contiguous block order: one transfer per head
    s2 = KVStore(1, H, D, device_budget_bytes=T * tb)
    k = torch.randn(H, T, D)
    start = s2.layers[0].append(k, k)
    order = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7]).expand(H, T)
    s2.layers[0].set_block_order(start, order)
    s2.layers[0].append(torch.randn(H, T, D), torch.randn(H, T, D))  # pushes block 1 to host
    assert s2.layers[0].tier_bounds() == (0, T, 2 * T)
    c0 = s2.counters()["fetch_host_transfers"]
    kk, _, _ = s2.layers[0].gather([torch.arange(0, T, 2)] * H)
    assert s2.counters()["fetch_host_transfers"] - c0 == H
    assert torch.equal(kk, k[:, 0:T:2])


def test_regroup_makes_a_cluster_over_many_blocks_one_run():
    """A "cluster" of two tokens in each of six blocks: six runs per head as stored, one after the blocks
    are regrouped by cluster; the same K/V by id; the merged block moves to the host tier whole."""
    tb = token_bytes() * H
    T, B = 4, 6
    s = KVStore(1, H, D, device_budget_bytes=B * T * tb)
    k = torch.randn(H, B * T, D)
    for i in range(B):
        s.layers[0].append(k[:, i * T:(i + 1) * T], -k[:, i * T:(i + 1) * T])
    cluster = torch.tensor([i * T + j for i in range(B) for j in (1, 2)])
    member = torch.zeros(B * T, dtype=torch.bool)
    member[cluster] = True

    def by_cluster(a, b):  # the cluster's tokens first, arrival order inside
        key = (~member[a:b]).long() * (b - a) + torch.arange(b - a)
        return key.argsort().expand(H, b - a)

    with pytest.raises(ValueError, match="cut a block"):
        s.layers[0].regroup(2, B * T, by_cluster)
    assert s.layers[0].regroup(0, B * T, by_cluster) == B * T
    s.layers[0].append(torch.randn(H, T, D), torch.randn(H, T, D))  # pushes the merged block to the host, whole
    assert s.layers[0].tier_bounds() == (0, B * T, (B + 1) * T)
    c0 = s.counters()["fetch_host_transfers"]
    kk, vv, _ = s.layers[0].gather([cluster] * H)
    assert s.counters()["fetch_host_transfers"] - c0 == H  # one run per head (six before regrouping)
    assert torch.equal(kk, k[:, cluster]) and torch.equal(vv, -k[:, cluster])
    kk, _, _ = s.layers[0].gather(None)
    assert torch.equal(kk[:, :B * T], k)  # every token by id


def test_set_device_budget_moves_oldest_blocks_and_keeps_every_token():
    """A smaller device budget moves the oldest blocks to the host at once (counted as offloads); a
    larger one lets later blocks stay; every token reads back the same by id."""
    tb = token_bytes() * H
    s = KVStore(1, H, D, device_budget_bytes=12 * tb)
    k = torch.randn(H, 20, D)
    for i in range(0, 12, 3):
        s.layers[0].append(k[:, i:i + 3], -k[:, i:i + 3])
    assert s.layers[0].tier_bounds() == (0, 0, 12)
    s.set_device_budget(7 * tb)
    assert s.layers[0].tier_bounds() == (0, 6, 12)  # two 3-token blocks moved; 6 tokens fit in 7
    assert s.counters()["offload_device_host_bytes"] == 6 * tb
    s.set_device_budget(None)
    for i in range(12, 20, 4):
        s.layers[0].append(k[:, i:i + 4], -k[:, i:i + 4])
    assert s.layers[0].tier_bounds() == (0, 6, 20)  # unbounded now: nothing more moved
    kk, vv, _ = s.layers[0].gather(None)
    assert torch.equal(kk, k) and torch.equal(vv, -k)
    with pytest.raises(ValueError, match="device budget"):
        s.set_device_budget(-1)


def test_block_larger_than_device_budget_goes_to_host():
    tb = token_bytes() * H
    s = KVStore(1, H, D, device_budget_bytes=3 * tb)
    s.layers[0].append(torch.randn(H, 2, D), torch.randn(H, 2, D))
    s.layers[0].append(torch.randn(H, 5, D), torch.randn(H, 5, D))
    assert s.layers[0].tier_bounds() == (0, 7, 7)
    assert s.resident_bytes()["device"] == 0
    s.layers[0].append(torch.randn(H, 1, D), torch.randn(H, 1, D))
    assert s.layers[0].tier_bounds() == (0, 7, 8)


def test_evict_never_returned_and_memory_reclaimed():
    s = KVStore(1, H, D)
    k = torch.randn(H, 300, D)
    for i in range(300):
        s.layers[0].append(k[:, i : i + 1], k[:, i : i + 1])
        if i >= 14:
            s.layers[0].evict(torch.tensor([i - 10]))  # sink 4 + window 10, evict one per step
    assert s.layers[0].length == 300
    live = torch.cat([torch.arange(4), torch.arange(290, 300)])
    kk, _, _ = s.layers[0].gather(None)
    assert torch.equal(kk, k[:, live])
    kk, _, m = s.layers[0].gather([torch.tensor([0, 5, 295])] * H)  # 5 is evicted: skipped
    assert torch.equal(kk, k[:, [0, 295]]) and m is None
    assert s.layers[0].dev.used < 100  # compaction reclaimed the dead slots
    assert s.resident_bytes()["device"] == 14 * token_bytes() * H
    s.layers[0].evict(torch.tensor([0, 0, 1]))  # duplicates / repeats are fine
    with pytest.raises(IndexError):
        s.layers[0].evict(torch.tensor([300]))


def test_unwritable_disk_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bad = blocker / "kv"
    with pytest.raises(KVStoreDiskError) as e:
        KVStore(1, H, D, host_budget_bytes=100, disk_dir=bad)
    assert str(bad) in str(e.value)
    with pytest.raises(ValueError, match="disk_dir"):
        KVStore(1, H, D, host_budget_bytes=100)


def test_disk_full_is_clear_and_leaves_store_consistent(tmp_path, monkeypatch):
    tb = token_bytes() * H
    s = KVStore(1, H, D, device_budget_bytes=2 * tb, host_budget_bytes=2 * tb, disk_dir=tmp_path)
    N = 600  # more than the first disk reservation (256 slots)
    k = torch.randn(H, N, D)
    for i in range(4):
        s.layers[0].append(k[:, i : i + 1], k[:, i : i + 1])

    def full(fd, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_mod, "_fallocate", full)
    with pytest.raises(KVStoreDiskError) as e:
        for i in range(4, N):
            s.layers[0].append(k[:, i : i + 1], k[:, i : i + 1])
    assert str(tmp_path) in str(e.value) and "disk full" in str(e.value)
    n = s.layers[0].length
    assert 4 < n < N
    kk, vv, _ = s.layers[0].gather(None)
    assert torch.equal(kk, k[:, :n]) and torch.equal(vv, k[:, :n])
    assert sum(s.resident_bytes().values()) == n * tb
    monkeypatch.undo()
    for i in range(n, N):
        s.layers[0].append(k[:, i : i + 1], k[:, i : i + 1])
    kk, _, _ = s.layers[0].gather(None)
    assert torch.equal(kk, k)
    sess = s.disk_dir
    assert sess.parent == tmp_path and sess.exists()
    s.close()
    assert not sess.exists()


def test_bad_shapes_and_orders():
    s = KVStore(1, H, D)
    with pytest.raises(ValueError):
        s.layers[0].append(torch.randn(H + 1, 2, D), torch.randn(H + 1, 2, D))
    st_ = s.layers[0].append(torch.randn(H, 3, D), torch.randn(H, 3, D))
    with pytest.raises(ValueError):
        s.layers[0].set_block_order(st_, torch.tensor([[0, 0, 1], [0, 1, 2]]))
    with pytest.raises(ValueError):
        s.layers[0].set_block_order(1, torch.tensor([[0, 1], [0, 1]]))
    with pytest.raises(ValueError):
        s.layers[0].gather([torch.tensor([0])])


def test_stale_disk_dirs_of_killed_runs_are_removed(tmp_path):
    """A vrex-kv-* directory whose owner process is gone (a kill -9) is removed by the next store;
    one whose owner lives (this process) is kept."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "vrex-kv-stale"
    stale.mkdir()
    (stale / "owner.pid").write_text(dead.stdout.strip())
    (stale / "layer000.k.bin").write_bytes(b"x" * 10)
    live = KVStore(1, 1, 4, host_budget_bytes=64, device_budget_bytes=32, disk_dir=tmp_path)
    assert not stale.exists()
    other = KVStore(1, 1, 4, host_budget_bytes=64, device_budget_bytes=32, disk_dir=tmp_path)
    assert live.disk_dir.exists() and other.disk_dir.exists()
    live.close()
    other.close()


def _held_bytes(objs, skip=("k", "v")) -> int:
    """Bytes of every tensor reachable from ``objs`` through attributes, lists, dicts and deques, each storage
    once, except attributes named in ``skip`` (the K/V buffers): whatever per-token map a layer keeps."""
    seen: dict[int, int] = {}
    stack, visited = list(objs), set()
    while stack:
        o = stack.pop()
        if id(o) in visited:
            continue
        visited.add(id(o))
        if isinstance(o, torch.Tensor):
            seen[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
        elif isinstance(o, (list, tuple, deque)):
            stack.extend(o)
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif hasattr(o, "__dict__") and not isinstance(o, (KVStore, type)):
            stack.extend(v for k, v in vars(o).items() if k not in skip)
    return sum(seen.values())


def test_index_bytes_per_cached_token_on_a_real_session(videollm, tmp_path, monkeypatch):
    """A real ReSV session spilling to disk (tiny budgets): what it keeps in memory per cached token, its
    token -> slot and token -> cluster maps plus the eviction flags, stays within what int32 entries,
    one partly filled page per map and the flags' doubling allow for the model's geometry (pages of
    64 tokens here so that several fill). The int64 maps this replaced (slot, cluster and the disk
    tier's slot -> token map) needed 24 bytes per token and KV head, above this bound."""
    import vrex.kv.index as index_mod
    from vrex.bench.media import long_stream
    from vrex.engine.session import SessionConfig, StreamingSession
    from vrex.kv.layers import model_geometry
    from vrex.kv.policies import make_policy

    page = 64
    monkeypatch.setattr(index_mod, "PAGE_TOKENS", page)
    g = model_geometry(videollm.lm)
    per_token_layer = 2 * g.head_dim * g.num_kv_heads * 4
    s = StreamingSession(videollm, make_policy("resv"), SessionConfig(
        theta=0.0, device_budget_bytes=40 * g.num_layers * per_token_layer,
        host_budget_bytes=60 * g.num_layers * per_token_layer, disk_dir=str(tmp_path)))
    frames = long_stream(48)
    s.fast_forward([t for t, _ in frames], videollm.encode_frames([im for _, im in frames]))
    n = s.store.layers[0].length
    assert s.store.layers[0].tier_bounds()[0] > n // 2  # most of the stream is on disk
    L, H = g.num_layers, g.num_kv_heads
    rings = sum(lay.dev.ids.numel() + lay.host.ids.numel() for lay in s.store.layers) * 4  # fixed by the budgets
    flags = sum(lay.evicted.numel() for lay in s.store.layers)
    assert flags <= 2 * n * L  # one byte per token, capacity at most doubled
    measured = _held_bytes(s.store.layers) + _held_bytes([t.tc for t in s.policy.tables])
    assert measured == s.store.index_nbytes() + sum(t.memory_bytes()["tokens"] for t in s.policy.tables)
    bound = 2 * L * H * 4 * (n + page) + rings + flags  # int32 entries of two maps, less than a page unused each
    assert measured <= bound
    assert bound - rings - flags < L * H * 24 * n
    s.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_block_straight_to_disk_is_stored_in_the_tier_type(tmp_path, dtype):
    """A block too big for the device and host budgets goes straight to disk: the cache hands float32
    keys to a bf16 store, and the disk tier writes them in its own type, as the rings do (it wrote the
    raw float32 bytes: a shape error, or garbage where the sizes happened to agree). set_keys alike."""
    s = KVStore(1, H, D, dtype=dtype, device_budget_bytes=0, host_budget_bytes=0, disk_dir=tmp_path)
    k, v = torch.randn(H, 5, D), torch.randn(H, 5, D)
    s.layers[0].append(k, v)
    assert s.layers[0].tier_bounds() == (5, 5, 5)  # all on disk
    kk, vv, _ = s.layers[0].gather(None)
    assert torch.equal(kk, k.to(dtype)) and torch.equal(vv, v.to(dtype))
    new = torch.randn(H, 5, D)
    s.layers[0].set_keys(new)
    assert torch.equal(s.layers[0].keys(), new.to(dtype))
    s.close()


def test_an_unbounded_ring_grows_with_its_slots_wrapped():
    """A ring that grows while its occupied slots wrap around its end keeps every slot's K, V and id
    (the growth copies runs as slices: the runs split where either capacity wraps)."""
    from vrex.kv.store import _Ring

    g = torch.Generator().manual_seed(3)
    ring = _Ring(2, 4, torch.float32, torch.device("cpu"), None)
    k, v = torch.randn(2, 80, 4, generator=g), torch.randn(2, 80, 4, generator=g)
    ids = torch.arange(80).expand(2, 80)
    ring.push(k[:, :64], v[:, :64], ids[:, :64])
    ring.pop_front(10)  # slots 10..63 live; the next pushes wrap to the ring's start
    ring.push(k[:, 64:69], v[:, 64:69], ids[:, 64:69])
    assert ring.cap == 64 and ring.hi % ring.cap < ring.front % ring.cap  # wrapped, not yet grown
    ring.push(k[:, 69:80], v[:, 69:80], ids[:, 69:80])  # 59 + 11 > 64: grows
    assert ring.cap == 128
    got_k, got_v, got_ids = ring.read(torch.arange(10, 80).expand(2, 70))
    assert torch.equal(got_k, k[:, 10:]) and torch.equal(got_v, v[:, 10:]) and torch.equal(got_ids, ids[:, 10:])
