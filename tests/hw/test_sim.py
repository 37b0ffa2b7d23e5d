"""System simulator sanity: monotonicity, breakdowns that add up, energy bounds, transfers."""

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


KVS = [0, 300, 1000, 2500, 5000, 10_000, 20_000, 40_000, 80_000, 120_000]  # a grid: the DRE samples are cached per shape


@settings(max_examples=120, deadline=None)
@given(name=st.sampled_from(SYSTEMS), stage=st.sampled_from(STAGES), a=st.sampled_from(KVS),
       b=st.sampled_from(KVS), batch=st.integers(1, 8), model=st.sampled_from([LLAMA, SMOL]))
def test_latency_and_energy_are_monotonic_in_kv(name, stage, a, b, batch, model):
    lo, hi = sorted((a, b))
    s1, s2 = step(name, lo, batch, stage, model), step(name, hi, batch, stage, model)
    assert s2.latency_s >= s1.latency_s * (1 - 1e-9)
    assert s2.energy_j >= s1.energy_j * (1 - 1e-9)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(SYSTEMS), stage=st.sampled_from(STAGES), kv=st.sampled_from(KVS[:-1]),
       b1=st.integers(1, 8), b2=st.integers(1, 8))
def test_step_latency_grows_with_batch_but_less_than_linearly_per_stream(name, stage, kv, b1, b2):
    lo, hi = sorted((b1, b2))
    s1, s2 = step(name, kv, lo, stage), step(name, kv, hi, stage)
    assert s2.latency_s >= s1.latency_s * (1 - 1e-9)
    if not load_system(name, FITTED).method.device_first:  # a device-first KV may spill at the larger batch
        # batching never costs more per stream than one stream at a time (between two batches, tile
        # wave quantisation on a GPU may make the larger one slightly worse per stream)
        assert s2.latency_s / hi <= step(name, kv, 1, stage).latency_s * (1 + 1e-9)


@pytest.mark.parametrize("name", SYSTEMS)
@pytest.mark.parametrize("stage", STAGES)
def test_breakdowns_sum_to_totals_and_energy_stays_within_physical_bounds(name, stage):
    hw = load_system(name, FITTED).hw
    link_w = hw.lanes * C.energy["link"]["pcie_w_per_lane"]
    for kv in (0, 1000, 40_000):
        s = step(name, kv, 2, stage)
        assert set(s.phases) == set(PHASES)
        assert math.isclose(sum(s.phases.values()), s.latency_s, rel_tol=1e-12)
        assert math.isclose(sum(s.energy_phases.values()), s.energy_j, rel_tol=1e-9)
        assert math.isclose(sum(s.energy_units.values()), s.energy_j, rel_tol=1e-12)
        assert all(v >= -1e-12 for v in (*s.phases.values(), *s.energy_units.values(), *s.energy_phases.values()))
        assert math.isclose(s.energy_units["PCIe"], link_w * s.unit_busy["link"], rel_tol=1e-12, abs_tol=1e-15)
        chip = s.energy_j - s.energy_units["PCIe"] - s.energy_units.get("SSD", 0) - s.energy_units.get("host DRAM", 0)
        if hw.kind == "gpu":  # between idle and loaded board power over the step
            assert hw.idle_w * s.latency_s * (1 - 1e-9) <= chip <= hw.power_w * s.latency_s * (1 + 1e-9)
        else:  # activity never draws more than Table I's platform power
            assert 0 < chip <= hw.power_w * s.latency_s
        assert 0 <= s.roofline_fraction <= 1 + 1e-9
        for unit, busy in s.unit_busy.items():  # no unit is busy longer than the step (the link overlaps)
            assert busy <= s.latency_s * (1 + 1e-9), unit


def test_vrex_unit_energies_follow_table_iii_and_busy_time():
    s = step("vrex8", 10_000)
    ap = C.area_power
    for unit in ("hcu", "wtu"):
        busy = s.unit_busy[unit.upper()]
        assert busy > 0
        assert math.isclose(s.energy_units[unit.upper()], ap["units"][unit]["power_mw"] / 1000 * 8 * busy)
    assert math.isclose(s.energy_units["KVMU"], ap["units"]["kvmu"]["power_mw"] / 1000 * 8 * s.unit_busy["link"])
    lpu = step("oaken8", 10_000)
    assert "HCU" not in lpu.energy_units and lpu.energy_units["LXE"] > 0


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
    assert s.energy_units["PCIe"] == 0 and s.energy_units["SSD"] == 0


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
