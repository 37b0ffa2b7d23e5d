"""The GPU baselines' ReSV prediction cost rests on a counted number of framework ops: keep it counted."""

from __future__ import annotations

from dataclasses import replace

import pytest

from vrex.hw.config import load_hardware, load_method, load_system
from vrex.hw.opcount import count_ops
from vrex.hw.sim import Workload, host_ops_time, simulate_step
from vrex.hw.model_shapes import preset


def test_configured_op_count_matches_the_software():
    """methods.yaml's ReSV op counts are vrex.resv's live counts (within 10%: a refactor that adds or
    removes a handful of ops is fine, a new per-head loop is not)."""
    live = count_ops(past_frames=40)
    m = load_method("resv")
    assert m.ops_per_layer == pytest.approx(live.total, rel=0.10), live.by_op
    assert m.clustering_ops_per_layer == pytest.approx(live.clustering, rel=0.10)
    assert 0 < live.syncs < live.kernels < live.total
    # the synchronising ops are few and each costs a device round trip: held to +-2 of the live count
    assert abs(m.syncs_per_layer - live.syncs) <= 2, live.by_op
    assert abs(m.clustering_syncs_per_layer - live.clustering_syncs) <= 2
    assert 0 < live.clustering_syncs < live.syncs


def test_op_count_does_not_grow_with_the_kv():
    """Vectorised over heads and clusters: the op count (the GPU's host cost) barely depends on the KV
    (a table growth adds a couple of ops now and then)."""
    assert count_ops(past_frames=20).total == pytest.approx(count_ops(past_frames=120).total, rel=0.03)


def test_prediction_time_is_ops_times_per_op_overhead():
    """AGX + ReSV's software prediction per layer = counted ops x the Orin's per-op host cost + counted
    syncs x the device round trip, split between clustering and scoring as counted."""
    sys_ = load_system("agx+resv")
    m, hw = sys_.method, load_hardware("agx_orin")
    assert hw.sync_s > 0
    s = simulate_step(sys_, preset("llama3-8b"), Workload(1000, 1), "frame")
    L = 32
    host_hash = m.clustering_ops_per_layer * hw.op_overhead_s + m.clustering_syncs_per_layer * hw.sync_s
    assert host_ops_time(m, hw, clustering=True) == pytest.approx(host_hash)
    # the hashing GEMM on the GPU adds a few microseconds; the host ops dominate
    assert s.phases["hash_cluster"] / L == pytest.approx(host_hash, rel=0.02)
    assert s.phases["hash_cluster"] / L >= host_hash
    pred = (s.phases["hash_cluster"] + s.phases["score_threshold"]) / L
    assert pred >= m.ops_per_layer * hw.op_overhead_s + m.syncs_per_layer * hw.sync_s


def test_each_sync_adds_its_round_trip():
    """The prediction grows by exactly layers x syncs x the added round trip, and its share of the
    step's latency grows with the round trip (the scoring and selection wait on the device too)."""
    sys_ = load_system("agx+resv")
    model, wl = preset("llama3-8b"), Workload(40000, 1)
    base = simulate_step(sys_, model, wl, "frame")
    slow = replace(sys_, hw=replace(sys_.hw, sync_s=sys_.hw.sync_s + 50e-6))
    s2 = simulate_step(slow, model, wl, "frame")
    pred = lambda r: r.phases["hash_cluster"] + r.phases["score_threshold"]  # noqa: E731
    assert pred(s2) - pred(base) == pytest.approx(32 * sys_.method.syncs_per_layer * 50e-6)
    assert s2.phases["hash_cluster"] - base.phases["hash_cluster"] == pytest.approx(
        32 * sys_.method.clustering_syncs_per_layer * 50e-6)
    assert pred(s2) / s2.latency_s > pred(base) / base.latency_s
    # hardware-sequenced V-Rex has no host ops and no syncs: its step does not move
    v = load_system("vrex8")
    vs = replace(v, hw=replace(v.hw, sync_s=1e-3))
    assert simulate_step(vs, model, wl, "frame").latency_s == simulate_step(v, model, wl, "frame").latency_s
