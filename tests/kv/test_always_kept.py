"""VrexCache adds the always-kept tokens (sink, recent window) to a policy's selection: sorted, unique, complete."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vrex.kv.cache import KeepConfig, VrexCache
from vrex.kv.policies import make_policy
from vrex.kv.store import KVStore


@settings(max_examples=200, deadline=None)
@given(
    n_past=st.integers(0, 60), sink=st.integers(0, 20), recent=st.integers(0, 20),
    picks=st.lists(st.lists(st.integers(0, 59), max_size=30), min_size=2, max_size=2),
)
def test_union_with_sink_and_recent(n_past, sink, recent, picks):
    cache = VrexCache(KVStore(1, 2, 4), make_policy("full"), KeepConfig(sink, recent), num_q_heads=2)
    indices = [torch.tensor(sorted({i for i in p if i < n_past}), dtype=torch.int64) for p in picks]
    got = cache._with_always_kept(indices, n_past)
    kept = set(range(min(sink, n_past))) | set(range(max(0, n_past - recent), n_past))
    for idx, out in zip(indices, got):
        assert out.tolist() == sorted(kept | set(idx.tolist()))
