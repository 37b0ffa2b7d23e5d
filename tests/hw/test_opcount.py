"""The GPU baselines' ReSV prediction cost rests on a counted number of framework ops: keep it counted."""

from __future__ import annotations

import pytest

from vrex.hw.config import load_hardware, load_method, load_system
from vrex.hw.opcount import count_ops
from vrex.hw.sim import Workload, simulate_step
from vrex.hw.model_shapes import preset


def test_configured_op_count_matches_the_software():
    """methods.yaml's ReSV op counts are vrex.resv's live counts (within 10%: a refactor that adds or
    removes a handful of ops is fine, a new per-head loop is not)."""
    live = count_ops(past_frames=40)
    m = load_method("resv")
    assert m.ops_per_layer == pytest.approx(live.total, rel=0.10), live.by_op
    assert m.clustering_ops_per_layer == pytest.approx(live.clustering, rel=0.10)
    assert 0 < live.syncs < live.kernels < live.total


def test_op_count_does_not_grow_with_the_kv():
    """Vectorised over heads and clusters: the op count (the GPU's host cost) barely depends on the KV
    (a table growth adds a couple of ops now and then)."""
    assert count_ops(past_frames=20).total == pytest.approx(count_ops(past_frames=120).total, rel=0.03)


def test_prediction_time_is_ops_times_per_op_overhead():
    """AGX + ReSV's software prediction per layer = counted ops x the Orin's per-op host cost, split
    between clustering and scoring in the counted proportion."""
    sys_ = load_system("agx+resv")
    m, hw = sys_.method, load_hardware("agx_orin")
    s = simulate_step(sys_, preset("llama3-8b"), Workload(1000, 1), "frame")
    L = 32
    hash_ops = (s.phases["hash_cluster"]) / L / hw.op_overhead_s
    # the hashing GEMM on the GPU adds a few microseconds; the op count dominates
    assert hash_ops == pytest.approx(m.clustering_ops_per_layer, rel=0.05)
    pred = (s.phases["hash_cluster"] + s.phases["score_threshold"]) / L
    assert pred >= m.ops_per_layer * hw.op_overhead_s
