"""Issue #21: energy from activity, capacity and spill, the DRE units in the loop, shape-derived
utilisation, the paper's roofline, and the LXE -> WTU score path against the software."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from vrex.hw import compute as cp
from vrex.hw import fit as fitmod
from vrex.hw.capacity import place
from vrex.hw.config import CONFIG_DIR, load_constants, load_fitted, load_method, load_system
from vrex.hw.dre import synth_sample, unit_cycles
from vrex.hw.energy import (Activity, core_other_w, mac_pj, sram_pj_per_byte, sram_table_iii_w, ssd_nj_per_byte,
                             step_energy)
from vrex.hw.hcu import HCUConfig, hcu_frame
from vrex.hw.lxe import lxe_scores
from vrex.hw.model_shapes import preset
from vrex.hw.sim import Workload, simulate_step
from vrex.hw.stats import PAPER
from vrex.hw.wtu import WTUConfig, wtu_select
from vrex.resv.wicsum import normalize_scores, wicsum_select

FITTED = load_fitted()
C = load_constants(FITTED)
LLAMA = preset("llama3-8b")


def step(name, kv, batch=1, stage="frame", stats=PAPER, c=C, dre=None):
    return simulate_step(load_system(name, FITTED), LLAMA, Workload(kv, batch), stage, stats, c, dre)


# ----------------------------------------------------------------------------- energy from activity
@pytest.mark.parametrize("name", ["vrex8", "vrex48", "a100+resv"])
def test_doubling_the_bytes_moved_doubles_link_and_tier_energy(name):
    """Two ReSV ratios at the trace's own KV size (no growth law): twice the selected tokens move about
    twice the bytes, and PCIe + tier energy follow the bytes (energy per byte is a constant)."""
    kv = 40_000
    lo, hi = (step(name, kv, stats=replace(PAPER, frame_ratio=r, ref_kv=float(kv))) for r in (0.1, 0.2))
    assert hi.link_bytes == pytest.approx(2 * lo.link_bytes, rel=0.08)
    per_byte = [s.energy_units["PCIe"] / s.link_bytes for s in (lo, hi)]
    assert per_byte[0] == pytest.approx(per_byte[1], rel=0.05)  # linear in bytes
    hw = load_system(name, FITTED).hw
    assert per_byte[0] >= hw.lanes * 3.0 / (hw.link_bw * hw.link_eff) * 0.99  # the paper's 3 W per lane at the payload rate
    tier = "SSD" if hw.offload == "ssd" else "host DRAM"
    assert hi.energy_units[tier] > 1.8 * lo.energy_units[tier]
    assert hi.energy_j > lo.energy_j


def test_small_runs_cost_more_link_energy_per_byte_than_cluster_runs():
    """Without the KVMU, selected tokens come in short arrival-order runs: the SSD becomes command-bound,
    the link stays busy longer per byte, and PCIe energy per byte rises (it follows busy time)."""
    st = replace(PAPER, frame_ratio=0.1, ref_kv=40_000.0)
    kvpu, vx = step("vrex8-kvpu", 40_000, stats=st), step("vrex8", 40_000, stats=st)
    assert kvpu.energy_units["PCIe"] / kvpu.link_bytes > 1.05 * vx.energy_units["PCIe"] / vx.link_bytes


def test_vrex_energy_counts_macs_and_dram_bits():
    s = step("vrex8", 5_000)
    e_dram = C.energy["dram"]["LPDDR5"]
    assert s.energy_units["DRAM"] == pytest.approx(s.dram_bytes * 8 * e_dram["pj_per_bit"] * 1e-12
                                                   + e_dram["background_w"] * s.latency_s)
    hw = load_system("vrex8", FITTED).hw
    assert 0.5 < mac_pj(hw, C) < 1.0  # Table III: 0.886 x 2.609 W / (4096 MACs x 0.8 GHz) = 0.705 pJ
    big = step("vrex8", 5_000, batch=4)  # four frame encoders: four times the MACs of the vision phase
    assert big.energy_phases["vision"] > 3.5 * s.energy_phases["vision"]


def test_sram_energy_is_charged_per_byte_and_table_iii_is_not_counted_twice():
    hw = load_system("vrex8", FITTED).hw
    e = sram_pj_per_byte(hw, C) * 1e-12
    # Horowitz's 2.5 pJ/B (45 nm, 32 KB) x Table III's MAC / Horowitz's fp16 MAC (0.705 / 1.5)
    assert sram_pj_per_byte(hw, C) == pytest.approx(2.5 * mac_pj(hw, C) / 1.5)
    phases = {"qkv": 1e-3, "attention": 2e-3, "hash_cluster": 0.0, "score_threshold": 0.0, "transfer": 0.0}
    base = Activity(flops={"qkv": 1e9}, dram_bytes={"qkv": 1e7}, sram_bytes={"qkv": 3e7, "attention": 5e6})
    more = replace(base, sram_bytes={"qkv": 6e7, "attention": 5e6})  # the qkv phase's SRAM bytes doubled
    (t0, ph0, u0), (t1, ph1, u1) = step_energy(hw, C, phases, base), step_energy(hw, C, phases, more)
    assert t1 - t0 == pytest.approx(3e7 * e, rel=1e-9)
    assert u1["SRAM"] - u0["SRAM"] == pytest.approx(3e7 * e, rel=1e-12) and u0["SRAM"] == pytest.approx(3.5e7 * e, rel=1e-12)
    assert ph1["qkv"] - ph0["qkv"] == pytest.approx(3e7 * e, rel=1e-9) and ph1["attention"] == ph0["attention"]
    for t, ph, u in ((t0, ph0, u0), (t1, ph1, u1)):
        assert sum(ph.values()) == pytest.approx(t, rel=1e-12) and sum(u.values()) == pytest.approx(t, rel=1e-12)
    # Table III's core power = DPE at full rate + the SRAM read stream that rate needs + DRE units + the
    # always-on rest: the per-byte charge replaces part of the old always-on share, never adds to it
    ap = C.area_power
    dpe_w = 64 * 64 * hw.freq_hz * mac_pj(hw, C) * 1e-12
    units_w = sum(u["power_mw"] for u in ap["units"].values()) * 1e-3
    per_core = dpe_w + (sram_table_iii_w(hw, C) + core_other_w(hw, C)) / hw.cores + units_w
    assert per_core == pytest.approx(ap["core"]["power_mw"] * 1e-3, rel=1e-12)
    assert sram_table_iii_w(hw, C) == pytest.approx(8 * 128 * 0.8e9 * e) and core_other_w(hw, C) > 0
    # in the simulator: every step's SRAM energy is its counted bytes x the constant
    s = step("vrex8", 5_000)
    assert s.energy_units["SRAM"] == pytest.approx(s.extra["sram_bytes"] * e, rel=1e-12)
    big = step("vrex8", 5_000, batch=4)  # four frame encoders: about four times the encoder's SRAM traffic
    assert big.extra["sram_bytes"] > 1.5 * s.extra["sram_bytes"]


def test_ssd_energy_per_byte_is_the_derived_figure():
    hw = load_system("vrex8", FITTED).hw
    assert ssd_nj_per_byte(hw, C) == pytest.approx(4.0 / 3.5)  # 4 W over PCIe 3.0 x4's 3.5 GB/s payload
    s = step("vrex8", 40_000)  # cluster runs: bandwidth-bound, so close to the figure (never below it)
    per_byte = s.energy_units["SSD"] / s.link_bytes * 1e9
    assert ssd_nj_per_byte(hw, C) * (1 - 1e-9) <= per_byte <= 1.1 * ssd_nj_per_byte(hw, C)


def test_no_energy_constant_is_fitted():
    text = (CONFIG_DIR / "energy.yaml").read_text()
    assert "fitted:" not in text
    assert not set(fitmod.PARAMS) & set(C.energy)
    assert len(fitmod.PARAMS) <= 2


def test_gpu_waiting_on_the_link_draws_idle_power():
    s = step("agx+flexgen", 40_000, stage="decode")  # (its frame step computes attention on the CPU)
    hw = load_system("agx+flexgen", FITTED).hw
    board = s.energy_units[f"{hw.label} board"]
    wait = s.phases["transfer"]
    assert wait > 0.3 * s.latency_s  # FlexGen's decode at 40K waits on the SSD
    assert board == pytest.approx(hw.power_w * (s.latency_s - wait) + hw.idle_w * wait)


# ----------------------------------------------------------------------------- capacity and spill
def test_what_fits_and_what_spills():
    agx, oaken, fg = load_system("agx+flexgen", FITTED).hw, load_method("oaken"), load_method("flexgen")
    one = place(agx, oaken, LLAMA, 1, 40_000, C)
    assert one.fits and not one.spills and one.device_tokens == 40_000
    big = place(agx, oaken, LLAMA, 8, 120_000, C)  # 8 x 120K x ~34 KB = 33 GB: more than the Orin holds
    assert not big.fits and big.spills and big.offloaded_tokens > 0
    assert 8 * big.device_tokens * big.kv_token_bytes <= big.free_bytes
    full = place(agx, fg, LLAMA, 1, 40_000, C)  # retrieval methods offload beyond the recent window
    assert full.device_tokens == C["device_window_tokens"] and full.offloaded_tokens == 40_000 - full.device_tokens
    assert not place(agx, fg, LLAMA, 8, 40_000, C).fits  # 8 x 40K x 128 KB = 42 GB


def test_quantised_kv_spills_to_the_link_only_when_it_no_longer_fits():
    fits = step("oaken8", 40_000)
    spill = step("oaken8", 120_000, batch=8)
    assert fits.link_bytes == 0 and fits.extra["spills"] == 0
    assert spill.link_bytes > 0 and spill.extra["spills"] == 1 and spill.phases["transfer"] > 0
    assert spill.latency_s / 8 > step("oaken8", 120_000).latency_s  # spilling costs more than batching saves


def test_flexgen_pays_its_scheduling_overhead_per_layer():
    fg = step("agx+flexgen", 1000)
    c0 = load_constants(FITTED)
    no_sched = simulate_step(replace(load_system("agx+flexgen", FITTED), method=replace(load_method("flexgen"), sched_tasks_per_layer=0)),
                             LLAMA, Workload(1000), "frame", PAPER, c0)
    hw = load_system("agx+flexgen", FITTED).hw
    assert fg.latency_s - no_sched.latency_s == pytest.approx(32 * 7 * hw.op_overhead_s)


# ----------------------------------------------------------------------------- shapes, not fits
def test_lxe_utilisation_comes_from_tiling():
    hw = load_system("vrex8", FITTED).hw
    assert cp.lxe_cycles(64, 64, 64 * 8, 8) == 64  # one tile per core, one row per cycle
    assert cp.lxe_cycles(1, 65, 64, 8) == 2  # K padding: two tree passes
    w = cp.matmul(hw, 576, 1024, 4096)  # a ViT FFN GEMM: ideal tiling, activations re-streamed per pass
    assert w.compute_s == pytest.approx(576 * 16 * 64 / 8 / hw.freq_hz)
    assert w.seconds == pytest.approx(max(w.compute_s, w.dram_bytes / (hw.dram_bw * hw.mem_eff)))
    assert cp.utilisation(w, hw) > 0.7
    g = cp.matmul(hw, 10, 4096, 14336)  # a frame's FFN GEMM: weight-streaming, memory-bound
    assert g.seconds == pytest.approx(g.dram_bytes / (hw.dram_bw * hw.mem_eff)) and cp.utilisation(g, hw) < 0.05
    a100 = load_system("a100+flexgen", FITTED).hw
    assert cp.gpu_tile_eff(128 * 108, 128, 108) == 1.0 and cp.gpu_tile_eff(129, 128, 108) < 0.02


# ----------------------------------------------------------------------------- the units in the loop
@pytest.mark.parametrize("kv,T", [(2_000, 10), (12_000, 10), (12_000, 1)])
def test_simulator_dre_cycles_equal_the_bit_exact_units_on_the_same_inputs(kv, T):
    g = LLAMA.num_attention_heads // LLAMA.num_key_value_heads
    sample = synth_sample(kv // 32, 10, T, T * g, LLAMA.head_dim, seed=3, max_rows=T * g)
    assert sample.scores.shape[0] == T * g  # every row present: no scaling between sample and step
    stage = "frame" if T == 10 else "decode"
    s = step("vrex8", kv, batch=2, stage=stage, dre=sample)
    hcu = hcu_frame(sample.new_codes[None], sample.cand_codes[None], cfg=HCUConfig()).cycles
    wtu = wtu_select(sample.scores, sample.counts, cfg=WTUConfig(norm="shift_min", scale=sample.scale)).cycles
    hk = LLAMA.num_key_value_heads
    assert s.extra["hcu_cycles"] == 2 * hk * hcu and s.extra["wtu_cycles"] == 2 * hk * wtu
    hw = load_system("vrex8", FITTED).hw
    assert s.unit_busy["WTU"] == pytest.approx(LLAMA.num_hidden_layers * 2 * hk * wtu / (hw.freq_hz * hw.cores))
    other = step("vrex8", kv, batch=2, stage=stage, dre=synth_sample(kv // 8, 10, T, T * g, LLAMA.head_dim, seed=3, max_rows=T * g))
    assert other.unit_busy["WTU"] > s.unit_busy["WTU"]  # 4x the clusters: the unit's cycles, not a formula


def test_unit_cycles_scale_sampled_rows_to_all_rows():
    s = synth_sample(200, 10, 10, 40, 128, seed=1)
    assert s.scores.shape[0] == 16  # MAX_ROWS sampled of 40
    u = unit_cycles(s)
    direct = wtu_select(s.scores, s.counts, cfg=WTUConfig(norm="shift_min", scale=s.scale)).cycles
    assert u.wtu == pytest.approx(direct * 40 / 16) and 0 < u.scan_fraction <= 1


# ----------------------------------------------------------------------------- the paper's roofline
def test_roofline_is_attention_and_retrieval_on_the_link_aware_roof():
    for name in ("agx+flexgen", "agx+rekv", "vrex8"):
        s = step(name, 40_000)
        hw = load_system(name, FITTED).hw
        assert 0 < s.roofline_fraction <= 1
        # with KV offloaded, the link roof (OI_link x link BW) bounds the attained FLOP/s
        assert s.extra["attained_ar_tflops"] * 1e12 <= s.extra["oi_link"] * hw.link_bw * (1 + 1e-9)
    fg = step("agx+flexgen", 40_000)
    assert fg.roofline_fraction > 0.5  # FlexGen streams the whole KV: it sits on the link roof


# ----------------------------------------------------------------------------- LXE scores -> WTU vs software
def test_lxe_score_path_and_wtu_selection_equal_the_software_on_bf16_exact_inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-4, 5, (12, 64), generator=g).float()
    kc = torch.randint(-4, 5, (40, 64), generator=g).float()
    counts = torch.randint(1, 40, (40,), generator=g)
    hw_scores = lxe_scores(q, kc)
    sw_scores = torch.bmm(q[None], kc.T[None])[0]  # the ReSV policy's float32 path
    assert torch.equal(hw_scores, sw_scores)  # integer dot products < 2^8: exact in BF16 and float32
    cfg = WTUConfig(ratio=0.3, norm="shift_min", scale=0.125)
    hw_sel = wtu_select(hw_scores, counts, cfg=cfg).selected
    sw = wicsum_select(normalize_scores(sw_scores, mode="shift_min", scale=0.125), counts, 0.3)
    assert torch.equal(hw_sel, sw.selected)


def test_lxe_score_path_difference_is_measured_on_float_inputs():
    g = torch.Generator().manual_seed(1)
    q, kc = torch.randn(16, 128, generator=g), torch.randn(300, 128, generator=g)
    counts = torch.randint(1, 64, (300,), generator=g)
    hw_scores, sw_scores = lxe_scores(q, kc), q @ kc.T
    rel = ((hw_scores - sw_scores).abs().max() / sw_scores.std()).item()
    assert 0 < rel < 0.03  # BF16 operands and output: measured 1.3% of the score spread at most
    cfg = WTUConfig(ratio=0.3, norm="shift_min", scale=1 / math.sqrt(128))
    hw_sel = wtu_select(hw_scores, counts, cfg=cfg).selected
    sw_sel = wicsum_select(normalize_scores(sw_scores, mode="shift_min", scale=cfg.scale), counts, 0.3).selected
    flips = (hw_sel != sw_sel).sum().item()  # measured: 10 of 4,800 (row, cluster) decisions, union equal
    assert flips <= 0.01 * hw_sel.numel()  # only clusters at a row's threshold edge move
