"""FlexGen's CPU delegation: attention over an offloaded KV runs on the host CPU (methods.yaml)."""

from __future__ import annotations

import dataclasses

import pytest

from vrex.hw.config import load_constants, load_fitted, load_system
from vrex.hw.model_shapes import preset
from vrex.hw.sim import Workload, simulate_step

FITTED = load_fitted()
C = load_constants(FITTED)
LLAMA = preset("llama3-8b")


def _step(system, kv: int, stage: str = "frame", batch: int = 1):
    s = load_system(system, FITTED) if isinstance(system, str) else system
    return simulate_step(s, LLAMA, Workload(kv, batch), stage, c=C)  # type: ignore[arg-type]


def test_attention_time_is_the_cpu_roofline():
    """AGX + FlexGen's attention at 40K = max(FLOPs / achieved CPU FLOP/s, bytes / CPU bandwidth)."""
    sys_ = load_system("agx+flexgen", FITTED)
    s = _step(sys_, 40_000)
    L = LLAMA.num_hidden_layers
    T, g, hk, D = 10, 4, 8, 128
    n = 40_000 + T
    flops = 2 * 2 * T * g * n * D * hk  # Q.K^T and P.V per KV head
    expect = flops / sys_.hw.host_cpu_flops
    assert s.phases["attention"] / L == pytest.approx(expect, rel=0.02)
    assert 0.1 <= sys_.hw.host_cpu_flops / 281.6e9 <= 0.8  # inside the fitter's range


def test_delegation_makes_the_frame_step_longer_than_decode_by_a_kv_dependent_gap():
    """10 query rows per KV position on a slow CPU: the frame-decode gap grows with the KV (the paper's
    40K gap is ~0.39 s); without delegation (GPU attention) the gap is the encoder, flat."""
    gap = {kv: _step("agx+flexgen", kv).latency_s - _step("agx+flexgen", kv, "decode").latency_s for kv in (1_000, 40_000)}
    assert gap[40_000] > gap[1_000] + 0.15
    sys_ = load_system("agx+flexgen", FITTED)
    gpu = dataclasses.replace(sys_, method=dataclasses.replace(sys_.method, cpu_attention=False))
    flat = {kv: _step(gpu, kv).latency_s - _step(gpu, kv, "decode").latency_s for kv in (1_000, 40_000)}
    assert abs(flat[40_000] - flat[1_000]) < 0.05


def test_no_delegation_when_nothing_is_offloaded_or_on_v_rex():
    """Delegation needs an offloaded KV and a host CPU: the retrieval methods and V-Rex keep attention
    on their engine."""
    for system in ("agx+resv", "vrex8", "oaken8"):
        s = _step(system, 40_000)
        assert s.phases["attention"] < _step("agx+flexgen", 40_000).phases["attention"] / 3, system

