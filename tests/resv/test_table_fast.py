"""The fused C++ ``hc_add`` (vrex.kv.fast) leaves an HC table exactly as the PyTorch ``HCTable.add``.

Two tables get the same steps (frames, text steps, singleton steps) on correlated random keys
(hypothesis over thresholds, rules, scope windows, head counts and code widths) and on the real
model's post-RoPE keys; after every step their ids and every state tensor must be equal, bit for bit.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from vrex.kv.fast import available
from vrex.resv.hashing import make_hyperplanes
from vrex.resv.table import HCTable

from _resv_checks import correlated_frames

pytestmark = pytest.mark.skipif(not available(), reason="the C++ kernels could not be built here")


def _assert_same(fast: HCTable, ref: HCTable) -> None:
    a, b = fast.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
    fc, fv = fast.candidates()
    rc, rv = ref.candidates()
    assert torch.equal(fc[fv], rc[rv])


def _pair(H, D, n_hp, seed, **kw):
    planes = make_hyperplanes(1, H, D, n_hp, seed=seed)[0]
    return HCTable(H, D, planes, **kw), HCTable(H, D, planes, **kw)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    H=st.integers(1, 3),
    T=st.integers(1, 14),
    n_hp=st.sampled_from([8, 13, 32, 64]),
    threshold=st.integers(0, 12),
    inclusive=st.booleans(),
    rule=st.sampled_from(["nearest", "first"]),
    scope=st.sampled_from([0, 1, 3, 32]),
    noise=st.sampled_from([0.02, 0.3, 2.0]),
    frozen=st.sampled_from(["bfloat16", "float32"]),
)
def test_fused_add_equals_reference(seed, H, T, n_hp, threshold, inclusive, rule, scope, noise, frozen):
    D = 16
    fast, ref = _pair(H, D, n_hp, seed, threshold=min(threshold, n_hp), inclusive=inclusive, rule=rule,
                      scope_frames=scope, frozen_means=frozen)
    assert fast.fused_add_applies
    start = 0
    for i, fr in enumerate(correlated_frames(8, H, T, D, noise, seed)):
        if i == 4:  # a text step: clustered without ticking the frame clock, then singletons
            for tab in (fast, ref):
                tab.add_singletons(fr[:, :1], start)
            start += 1
            ids_f = fast.add(fr[:, :3], start, is_frame=False, fast=True)
            ids_r = ref.add(fr[:, :3], start, is_frame=False)
            assert torch.equal(ids_f, ids_r)
            start += ids_f.shape[1]
        ids_f = fast.add(fr, start, fast=True)
        ids_r = ref.add(fr, start)
        assert torch.equal(ids_f, ids_r)
        start += T
        _assert_same(fast, ref)
    assert torch.equal(fast.last_comparisons, ref.last_comparisons)


def test_fused_add_on_real_keys_of_the_real_model(videollm, photos):
    """Every layer's table of a short real stream, built both ways from the same post-RoPE keys."""
    from vrex.engine.session import SessionConfig, StreamingSession
    from vrex.kv.policies import make_policy

    s = StreamingSession(videollm, make_policy("full"), SessionConfig(theta=0.0, kernels="reference"))
    for i, image in enumerate(photos[:4]):
        s.push_frame(0.5 * i, image)
    cfg = videollm.lm.config
    H = cfg.num_key_value_heads
    D = cfg.hidden_size // cfg.num_attention_heads
    for layer in (0, 7, cfg.num_hidden_layers - 1):
        keys, _, _ = s.store.layers[layer].gather(None)
        keys = keys.float()
        fast, ref = _pair(H, D, 32, layer, threshold=7, scope_frames=32)
        step = videollm.tokens_per_frame + 1
        for start in range(0, keys.shape[1], step):
            blk = keys[:, start:start + step]
            assert torch.equal(fast.add(blk, start, fast=True), ref.add(blk, start))
        _assert_same(fast, ref)
        assert int(fast.n_clusters.min()) < keys.shape[1]  # real keys do cluster


def test_options_the_kernel_does_not_implement_take_the_reference_path():
    for kw in ({"intra": "leaders"}, {"code_update": "majority"}, {"scope_frames": None}, {"max_candidates": 4}):
        fast, ref = _pair(2, 16, 32, 0, **kw)
        assert not fast.fused_add_applies
        for i, fr in enumerate(correlated_frames(3, 2, 5, 16, 0.1, 0)):
            assert torch.equal(fast.add(fr, 5 * i, fast=True), ref.add(fr, 5 * i))
        _assert_same(fast, ref)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    H=st.integers(1, 3),
    D=st.sampled_from([8, 16, 40, 64]),
    frames=st.integers(1, 40),
    code_update=st.sampled_from(["leader", "majority", "mean"]),
    frozen=st.sampled_from(["bfloat16", "float32"]),
)
def test_rebuild_sums_in_cpp_equal_reference(seed, H, D, frames, code_update, frozen):
    """After re-indexing, ``rebuild(fast=True)`` (C++ ``cluster_sums``) leaves the table bit for bit as the
    ``index_add_`` reference: the same float32 additions in the same token order, dims split in blocks of
    32 (D=40 and 64 cross a block edge), with compacted bfloat16 pages when out-of-scope pages exist."""
    T = 6
    fast, ref = _pair(H, D, 32, seed, code_update=code_update, scope_frames=2, frozen_means=frozen)
    blocks = correlated_frames(frames, H, T, D, 0.2, seed)
    for i, fr in enumerate(blocks):
        fast.add(fr, i * T)
        ref.add(fr, i * T)
    turned = torch.cat(blocks, 1).roll(1, dims=-1) * 1.5 + 0.25  # any new keys, same tokens
    fast.rebuild(turned, fast=True)
    ref.rebuild(turned)
    _assert_same(fast, ref)


def test_cluster_sums_refuses_a_cluster_id_outside_the_table():
    from vrex.kv.fast import load

    keys, clusters = torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.int64)
    clusters[1, 3] = 4
    with pytest.raises(RuntimeError, match="cluster id 4 outside 0..3"):
        load().cluster_sums(keys, clusters, 4)
    torch.testing.assert_close(load().cluster_sums(keys, clusters.clamp(max=3), 4)[0, 0], keys[0].sum(0))
