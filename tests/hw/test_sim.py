"""System simulator sanity: monotonicity, breakdowns that add up, energy = power x time, transfers."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vrex.hw.config import load_constants, load_fitted, load_method, load_system, system_names
from vrex.hw.model_shapes import preset
from vrex.hw.sim import PHASES, Workload, episode, selected_ratio, simulate, simulate_step, transfer
from vrex.hw.stats import PAPER

FITTED = load_fitted()
C = load_constants(FITTED)
LLAMA = preset("llama3-8b")
SMOL = preset("smollm2-135m")
SYSTEMS = system_names()
STAGES = ("frame", "text", "decode")


def step(name, kv, batch=1, stage="frame", model=LLAMA, c=C):
    return simulate_step(load_system(name, FITTED), model, Workload(kv, batch), stage, PAPER, c)


@settings(max_examples=120, deadline=None)
@given(name=st.sampled_from(SYSTEMS), stage=st.sampled_from(STAGES), a=st.integers(0, 120_000),
       b=st.integers(0, 120_000), batch=st.integers(1, 8), model=st.sampled_from([LLAMA, SMOL]))
def test_latency_and_energy_are_monotonic_in_kv(name, stage, a, b, batch, model):
    lo, hi = sorted((a, b))
    s1, s2 = step(name, lo, batch, stage, model), step(name, hi, batch, stage, model)
    assert s2.latency_s >= s1.latency_s * (1 - 1e-9)
    assert s2.energy_j >= s1.energy_j * (1 - 1e-9)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(SYSTEMS), stage=st.sampled_from(STAGES), kv=st.integers(0, 80_000),
       b1=st.integers(1, 8), b2=st.integers(1, 8))
def test_step_latency_grows_with_batch_but_less_than_linearly_per_stream(name, stage, kv, b1, b2):
    lo, hi = sorted((b1, b2))
    s1, s2 = step(name, kv, lo, stage), step(name, kv, hi, stage)
    assert s2.latency_s >= s1.latency_s * (1 - 1e-9)
    assert s2.latency_s / hi <= s1.latency_s / lo * (1 + 1e-9)  # batching never hurts per-stream cost


@pytest.mark.parametrize("name", SYSTEMS)
@pytest.mark.parametrize("stage", STAGES)
def test_breakdowns_sum_to_totals_and_energy_is_power_times_time(name, stage):
    for kv in (0, 1000, 40_000):
        s = step(name, kv, 2, stage)
        assert set(s.phases) == set(PHASES)
        assert math.isclose(sum(s.phases.values()), s.latency_s, rel_tol=1e-12)
        assert math.isclose(sum(s.energy_phases.values()), s.energy_j, rel_tol=1e-12)
        assert math.isclose(sum(s.energy_units.values()), s.energy_j, rel_tol=1e-12)
        assert all(v >= 0 for v in (*s.phases.values(), *s.energy_units.values()))
        hw = load_system(name, FITTED).hw
        link_w = hw.lanes * C.storage["link"]["pcie_w_per_lane"]
        assert math.isclose(s.energy_units["PCIe"], link_w * s.unit_busy["link"], rel_tol=1e-12, abs_tol=1e-15)
        non_link = s.energy_j - s.energy_units["PCIe"] - s.energy_units.get("SSD", 0) - s.energy_units.get("host DRAM", 0)
        assert math.isclose(non_link, hw.power_w * s.latency_s, rel_tol=1e-9)  # board power x step time
        if s.link_bytes == 0:
            assert math.isclose(s.energy_j, hw.power_w * s.latency_s, rel_tol=1e-12)
        assert 0 < s.roofline_fraction <= 1 + 1e-9
        for unit, busy in s.unit_busy.items():  # no unit is busy longer than the step (the link overlaps)
            assert busy <= s.latency_s * (1 + 1e-9), unit


def test_vrex_unit_energies_follow_table_iii():
    s = step("vrex8", 10_000)
    ap = C.area_power
    for unit in ("hcu", "wtu", "kvmu"):
        assert math.isclose(s.energy_units[unit.upper()], ap["units"][unit]["power_mw"] / 1000 * 8 * s.latency_s)
    core = ap["core"]["power_mw"] / 1000 * 8
    assert math.isclose(s.energy_units["LXE"] + sum(s.energy_units[u.upper()] for u in ("hcu", "wtu", "kvmu")), core * s.latency_s)


def test_retrieval_moves_fewer_bytes_than_flexgen_and_kvmu_needs_fewer_commands():
    fg, rv, kvpu, vx = (step(n, 40_000) for n in ("agx+flexgen", "agx+resv", "vrex8-kvpu", "vrex8"))
    assert vx.link_bytes < fg.link_bytes and rv.link_bytes < fg.link_bytes
    assert vx.link_commands < kvpu.link_commands  # one command per cluster run vs per frame-run of K and of V
    assert vx.latency_s < kvpu.latency_s < fg.latency_s
    assert vx.phases["hash_cluster"] + vx.phases["score_threshold"] < 0.01 * vx.latency_s  # DRE hides prediction
    assert rv.phases["hash_cluster"] + rv.phases["score_threshold"] > 0.05 * rv.latency_s  # GPU software does not


def test_no_offload_no_transfer_and_everything_fits():
    c = load_constants(FITTED, {"device_window_tokens": 1e9})
    s = step("vrex8", 40_000, c=c)
    assert s.link_bytes == 0 and s.phases["transfer"] == 0 and s.offloaded_tokens == 0


def test_transfer_model_properties():
    me_all, me_tok, me_cl = (load_method(m) for m in ("flexgen", "resv", "resv_dre"))
    hw = load_system("vrex8", FITTED).hw
    full = transfer(hw, me_all, LLAMA, 1, 10_000, 10_000, 1.0, C, PAPER)
    assert full.useful_bytes == 10_000 * LLAMA.kv_bytes_per_token_layer
    assert full.link_bytes == pytest.approx(full.useful_bytes, rel=0.01)  # sequential: no read amplification
    few = transfer(hw, me_tok, LLAMA, 1, 10_000, 1_000, 0.1, C, PAPER)
    more = transfer(hw, me_tok, LLAMA, 1, 10_000, 2_000, 0.2, C, PAPER)
    assert more.link_bytes > few.link_bytes and more.seconds > few.seconds
    cl = transfer(hw, me_cl, LLAMA, 1, 10_000, 1_000, 0.1, C, PAPER)
    assert cl.commands < few.commands and cl.link_bytes <= few.link_bytes
    assert transfer(hw, me_tok, LLAMA, 1, 0, 0, 0.1, C, PAPER).seconds == 0


def test_selected_ratio_rules():
    resv, rekv = load_method("resv"), load_method("rekv")
    ref = C["ratio_ref_kv"]
    assert selected_ratio(resv, "frame", int(ref), C, PAPER) == pytest.approx(0.327)
    assert selected_ratio(resv, "decode", int(ref), C, PAPER) == pytest.approx(0.025)
    assert selected_ratio(resv, "frame", 40_000, C, PAPER) < selected_ratio(resv, "frame", 5_000, C, PAPER)
    assert selected_ratio(rekv, "frame", 40_000, C, PAPER) == selected_ratio(rekv, "frame", 1_000, C, PAPER) == 0.584
    traced = replace(PAPER, frame_ratio=0.2, ref_kv=500.0)
    assert selected_ratio(resv, "frame", 500, C, traced) == pytest.approx(0.2)
    assert selected_ratio(rekv, "frame", 500, C, traced) == 0.584  # traces describe our ReSV only


def test_simulate_and_episode_on_a_hf_config_dict():
    from vrex.hw.model_shapes import from_hf_config

    m = from_hf_config({"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                        "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936}, name="qwen2-0.5b")
    wl = Workload(8000, 2)
    r = simulate("vrex8", m, wl)
    e = episode(r, wl)
    assert e["latency_s"] == pytest.approx(26 * r["frame"].latency_s + r["text"].latency_s + 39 * r["decode"].latency_s)
    assert 0 < e["frame_share"] < 1 and e["energy_j_per_stream"] > 0
