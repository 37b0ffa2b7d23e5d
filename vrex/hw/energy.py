"""Activity-based energy of one step (constants: ``configs/energy.yaml``, Table III; none fitted).

V-Rex / LPU: ``E = MACs x e_mac + SRAM bytes x e_sram + DRAM bits x e_dram + DRAM background x t
+ core rest x t + DRE units x busy + PCIe (W/lane x lanes while moving) + offload tier (SSD active
power while reading, or host DDR4 bits x e_ddr4)``. Table III's core power is split so that nothing
is counted twice: DPE (``e_mac`` at full rate) + the SRAM read stream the DPE needs at full rate
(charged per byte, :func:`sram_pj_per_byte`) + DRE units (charged while busy) + the always-on rest
(:func:`core_other_w`) = 2,609 mW per core. GPUs: board power under load (Table I, measured by the
paper) while the GPU computes, idle power while it waits on the link, plus PCIe and the tier.
Every term is also attributed to a phase (so the phase and unit breakdowns both sum to the total).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .compute import TREE
from .config import Constants, Hardware


@dataclass
class Activity:
    """What a step did, per phase (dicts keyed by phase name)."""

    flops: dict[str, float] = field(default_factory=dict)
    sram_bytes: dict[str, float] = field(default_factory=dict)  # LXE SRAM bytes read + written
    dram_bytes: dict[str, float] = field(default_factory=dict)
    wait_s: float = 0.0  # critical-path time the compute engine waits (exposed transfer / DRE)
    link_busy_s: float = 0.0
    link_bytes: float = 0.0
    hcu_busy_s: float = 0.0
    wtu_busy_s: float = 0.0


def mac_pj(hw: Hardware, c: Constants) -> float:
    """Energy per BF16 MAC of the DPE from Table III (its power share over 64x64 MACs per cycle)."""
    ap = c.area_power
    return ap["core"]["power_mw"] * 1e-3 * ap["dpe"]["power_frac"] / (TREE * TREE * hw.freq_hz) * 1e12


def sram_pj_per_byte(hw: Hardware, c: Constants) -> float:
    """LXE SRAM energy per byte accessed: Horowitz's 45 nm 32 KB figure scaled to 14 nm by the ratio of
    Table III's MAC energy to Horowitz's 45 nm fp16 MAC (configs/energy.yaml)."""
    s = c.energy["vrex"]["sram"]
    return s["pj_per_64bit_45nm"] / 8 * mac_pj(hw, c) / s["mac_pj_45nm"]


def sram_table_iii_w(hw: Hardware, c: Constants) -> float:
    """The SRAM read stream inside Table III's core power (one input slice per cycle at full DPE rate),
    for all cores: the dynamic share that is charged per byte instead of always on."""
    s = c.energy["vrex"]["sram"]
    return hw.cores * s["table_iii_bytes_per_cycle"] * hw.freq_hz * sram_pj_per_byte(hw, c) * 1e-12


def core_other_w(hw: Hardware, c: Constants) -> float:
    """Always-on power of the cores' non-DPE logic (VPE, control, clock tree, SRAM leakage): Table III's
    non-DPE share minus the DRE units and minus the SRAM read stream (both charged by activity)."""
    ap = c.area_power
    units = sum(u["power_mw"] for u in ap["units"].values()) * 1e-3
    return hw.cores * (ap["core"]["power_mw"] * 1e-3 * (1 - ap["dpe"]["power_frac"]) - units) - sram_table_iii_w(hw, c)


def link_energy(hw: Hardware, c: Constants, busy_s: float) -> float:
    """PCIe energy: lanes x W per lane while transferring (the paper's value)."""
    return hw.lanes * c.energy["link"]["pcie_w_per_lane"] * busy_s


def ssd_nj_per_byte(hw: Hardware, c: Constants) -> float:
    """SSD read energy per byte when bandwidth-bound (derived): active power over the rate the link
    reads it (PCIe 3.0 x4: 4 W / 3.5 GB/s = 1.14 nJ/B); command-bound reads cost more per byte."""
    bw = min(hw.link_bw * hw.link_eff, c.storage["ssd"]["seq_read_gbps"] * 1e9)
    return c.energy["ssd"]["active_w"] / bw * 1e9


def tier_energy(hw: Hardware, c: Constants, busy_s: float, nbytes: float) -> float:
    """Offload tier: SSD active power while the link reads it, or host DDR4 per bit read."""
    if hw.offload == "ssd":
        return c.energy["ssd"]["active_w"] * busy_s
    return nbytes * 8 * c.energy["host_dram"]["pj_per_bit"] * 1e-12


def step_energy(hw: Hardware, c: Constants, phases: dict[str, float], act: Activity
                ) -> tuple[float, dict[str, float], dict[str, float]]:
    """``(total J, by phase, by unit)`` of a step with critical-path ``phases`` (seconds)."""
    latency = sum(phases.values())
    e_link = link_energy(hw, c, act.link_busy_s)
    e_tier = tier_energy(hw, c, act.link_busy_s, act.link_bytes)
    tier_name = "SSD" if hw.offload == "ssd" else "host DRAM"
    by_phase = {p: 0.0 for p in phases}
    if hw.kind == "vrex":
        ap, dram = c.area_power, c.energy["dram"][hw.dram_kind]
        e_mac = mac_pj(hw, c) * 1e-12
        e_bit = dram["pj_per_bit"] * 1e-12
        e_sram = sram_pj_per_byte(hw, c) * 1e-12
        static_w = core_other_w(hw, c) + dram["background_w"]
        for p in phases:
            by_phase[p] = (act.flops.get(p, 0.0) / 2 * e_mac + act.sram_bytes.get(p, 0.0) * e_sram
                           + act.dram_bytes.get(p, 0.0) * 8 * e_bit + static_w * phases[p])
        mw = {k: v["power_mw"] * 1e-3 * hw.cores for k, v in ap["units"].items()} if hw.dre else {}
        e_hcu, e_wtu = mw.get("hcu", 0.0) * act.hcu_busy_s, mw.get("wtu", 0.0) * act.wtu_busy_s
        e_kvmu = mw.get("kvmu", 0.0) * act.link_busy_s
        by_phase["hash_cluster"] += e_hcu
        by_phase["score_threshold"] += e_wtu
        by_phase["transfer"] += e_kvmu + e_link + e_tier
        dpe = sum(act.flops.values()) / 2 * e_mac
        dram_e = sum(act.dram_bytes.values()) * 8 * e_bit + dram["background_w"] * latency
        by_unit = {"LXE": dpe + core_other_w(hw, c) * latency, "SRAM": sum(act.sram_bytes.values()) * e_sram}
        if hw.dre:
            by_unit.update({"HCU": e_hcu, "WTU": e_wtu, "KVMU": e_kvmu})
        by_unit["DRAM"] = dram_e
    else:
        wait = min(act.wait_s, latency)
        for p in phases:
            by_phase[p] = hw.power_w * phases[p]
        # the waiting share of the step draws idle power instead of load power (taken off the transfer
        # phase, where the engine waits)
        by_phase["transfer"] -= (hw.power_w - hw.idle_w) * wait
        by_unit = {f"{hw.label} board": hw.power_w * (latency - wait) + hw.idle_w * wait}
        by_phase["transfer"] += e_link + e_tier
    by_unit["PCIe"] = e_link
    by_unit[tier_name] = e_tier
    total = sum(by_unit.values())
    return total, by_phase, by_unit


__all__ = ["Activity", "mac_pj", "sram_pj_per_byte", "sram_table_iii_w", "core_other_w", "ssd_nj_per_byte",
           "link_energy", "tier_energy", "step_energy"]
