"""Registry test: every registered policy goes through the same checks (kvpress style)."""

import dataclasses

import pytest
import torch

from vrex.kv.policies import POLICIES, make_policy, policy_params
from vrex.kv.policy import KVPolicy, Selection
from vrex.kv.store import KVStore

from _policy_cases import EVERYTHING
from _synthetic_keys import correlated_frames

L, HKV, HQ, D, T = 2, 2, 4, 16, 6

CONTENT_BASED = {"infinigen", "rekv", "resv", "resv-noclust"}
NAMES = sorted(POLICIES)


def test_registry_complete_and_documented():
    assert set(EVERYTHING) == set(POLICIES)
    for name, cls in POLICIES.items():
        assert cls.name == name and issubclass(cls, KVPolicy) and dataclasses.is_dataclass(cls)
        assert cls.__module__.startswith("vrex.kv.policies.")
        doc = (cls.__doc__ or "") + (__import__(cls.__module__, fromlist=["x"]).__doc__ or "")
        assert "Paper" in doc or "paper" in doc, name
        for p in policy_params(name):
            assert p in doc, f"{name}: parameter {p} is not documented"


def test_make_policy_errors_list_valid_choices():
    with pytest.raises(ValueError) as e:
        make_policy("quest")
    for n in POLICIES:
        assert n in str(e.value)
    with pytest.raises(ValueError) as e:
        make_policy("resv", ratioo=0.3)
    assert "ratioo" in str(e.value) and "n_hyperplanes" in str(e.value)
    with pytest.raises(ValueError):
        make_policy("resv", score_norm="nope")
    assert make_policy("RESV_NOCLUST").name == "resv-noclust"


def frames(n, seed=0, noise=0.3):
    return correlated_frames(n, HKV, T, D, noise, seed)


def run(policy: KVPolicy, n_frames=6, seed=0, qseed=100, with_store=False):
    """Drive a policy like the cache does (select, then append); return the selections of layer 0."""
    policy.setup(L, HKV, HQ, D)
    store = KVStore(L, HKV, D) if with_store else None
    g = torch.Generator().manual_seed(qseed)
    sels = []
    n = 0
    steps = [("frame", f, i) for i, f in enumerate(frames(n_frames, seed))]
    steps += [("text", torch.randn(HKV, 3, D, generator=g), None), ("decode", torch.randn(HKV, 1, D, generator=g), None)]
    for stage, keys, fid in steps:
        q = torch.randn(HQ, keys.shape[1], D, generator=g)
        for layer in range(L):
            if n:
                sel = policy.select(layer, q, n, stage)
                check_selection(sel, n)
                if layer == 0:
                    sels.append((stage, n, sel))
                if store is not None:
                    k, v, valid = store.layers[layer].gather(sel.indices)
                    allk = torch.cat([f for _, f, _ in steps], 1)
                    idx = sel.indices or [torch.arange(n)] * HKV
                    for h in range(HKV):
                        live = idx[h][~store.layers[layer].is_evicted()[idx[h]]]
                        assert torch.equal(k[h, : live.numel()], allk[h, live])
            if store is not None:
                start = store.layers[layer].append(keys, keys)
                assert start == n
            policy.on_append(layer, keys, n, fid)
            ev = policy.evictable(layer, n + keys.shape[1])
            if store is not None and ev is not None:
                store.layers[layer].evict(ev)
        n += keys.shape[1]
    return sels


def check_selection(sel: Selection, n_past: int):
    assert isinstance(sel, Selection)
    if sel.indices is None:
        return
    assert len(sel.indices) == HKV
    for idx in sel.indices:
        assert idx.dtype == torch.int64 and idx.dim() == 1
        if idx.numel():
            assert int(idx.min()) >= 0 and int(idx.max()) < n_past
            assert torch.all(idx[1:] > idx[:-1]), "indices must be sorted and unique"


def as_sets(sel: Selection, n_past: int):
    idx = sel.indices if sel.indices is not None else [torch.arange(n_past)] * HKV
    return [set(i.tolist()) for i in idx]


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_store_roundtrip(name):
    run(make_policy(name), with_store=True)


@pytest.mark.parametrize("name", NAMES)
def test_selecting_everything_equals_full(name):
    full = run(make_policy("full"))
    every = run(make_policy(name, **EVERYTHING[name]))
    assert len(full) == len(every)
    for (st1, n1, s1), (st2, n2, s2) in zip(full, every):
        assert (st1, n1) == (st2, n2)
        assert as_sets(s1, n1) == as_sets(s2, n2)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name):
    a, b = run(make_policy(name)), run(make_policy(name))
    for (_, n, s1), (_, _, s2) in zip(a, b):
        assert as_sets(s1, n) == as_sets(s2, n)
        assert s1.stats == s2.stats


@pytest.mark.parametrize("name", sorted(CONTENT_BASED))
def test_gqa_mapping_each_kv_head_serves_its_query_group(name):
    """A spike key in KV head h, aligned with the queries of h's group only, must be read by head h."""
    pol = make_policy(name)
    pol.setup(1, HKV, HQ, D)
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(HKV, D, generator=g), dim=-1)
    n = 0
    spikes = {}
    for f in range(8):
        keys = 0.1 * torch.randn(HKV, T, D, generator=g)
        for h in range(HKV):
            if f == 2 + 3 * h:
                keys[h, 1] = 20 * u[h]
                spikes[h] = n + 1
        pol.on_append(0, keys, n, f)
        n += T
    q = 0.01 * torch.randn(HQ, 2, D, generator=g)
    G = HQ // HKV
    for h in range(HKV):
        q[h * G : (h + 1) * G] += 10 * u[h]
    sel = as_sets(pol.select(0, q, n, "decode"), n)
    for h in range(HKV):
        assert spikes[h] in sel[h], (name, h)


@pytest.mark.parametrize("name", ["resv", "resv-noclust"])
def test_gqa_union_is_exact_for_wicsum(name):
    """ReSV: a KV head's selection is the union of what each of its query heads selects."""
    G = HQ // HKV
    base = make_policy(name, ratio=0.2)
    base.setup(1, HKV, HQ, D)
    n = 0
    for i, f in enumerate(frames(8, seed=3)):
        base.on_append(0, f, n, i)
        n += T
    q = torch.randn(HQ, 2, D, generator=torch.Generator().manual_seed(9))
    full = as_sets(base.select(0, q, n, "frame"), n)
    parts = []
    for j in range(G):
        qj = q.clone()
        for h in range(HKV):
            qj[h * G : (h + 1) * G] = q[h * G + j]  # every head of the group = query head j
        parts.append(as_sets(base.select(0, qj, n, "frame"), n))
    for h in range(HKV):
        assert full[h] == set().union(*(p[h] for p in parts))
