"""System performance/energy simulator (V-Rex §V): GPU baselines and V-Rex with its DRE.

An analytic, per-layer model (the paper used a cycle-level simulator with DRAMSim3/MQSim; this is
its roofline-level counterpart). One *step* is a frame's iterative prefill (``frame``), a question
prefill (``text``) or one generated token (``decode``) for ``batch`` independent streams that each
hold ``kv_tokens`` of KV. Per layer:

* **execution** on the compute engine (GPU or LXE): QKV projection, attention over the selected and
  current tokens, output projection + FFN; each phase takes ``max(FLOPs / (peak * util),
  DRAM bytes / (bandwidth * mem_eff))`` (weights are read once per step, KV once per stream);
* **retrieval** for the next layer: prediction (hashing + clustering, scoring + thresholding; on the
  GPU as framework ops with a per-op host overhead, on V-Rex split between the LXE and the DRE's
  HCU/WTU cycles) and the **transfer** of the selected offloaded KV over the link (sector- and
  command-accurate for the SSD, descriptor-accurate for host DRAM);
* **overlap**: layer ``l+1``'s transfer (and the DRE's work) runs during layer ``l``'s execution, so a
  layer costs ``prediction_on_engine + max(execution, DRE + transfer)``; the first layer's retrieval
  is exposed (pipeline fill).

Plus, per step, the frame encoder (``frame`` steps) and the LM head. Energy is the platform power
of Table I over the step, plus PCIe (W per lane while transferring) and the SSD / host DRAM.
Every constant is named in ``configs/`` and ``docs/hw.md``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from .config import Constants, Hardware, Method, System, load_constants, load_fitted, load_system
from .model_shapes import ModelShape, resolve
from .stats import PAPER, RetrievalStats

Stage = Literal["frame", "text", "decode"]
PHASES = ("vision", "qkv", "attention", "o_ffn", "hash_cluster", "score_threshold", "transfer", "lm_head")


@dataclass(frozen=True)
class Workload:
    """What the streams hold and ask (defaults: the paper's average COIN case, see :func:`episode`)."""

    kv_tokens: int
    batch: int = 1
    question_tokens: int = 25
    answer_tokens: int = 39
    frames: int = 26
    include_vision: bool = True


@dataclass
class StepResult:
    """One step of ``batch`` streams."""

    system: str
    stage: Stage
    kv_tokens: int
    batch: int
    latency_s: float
    phases: dict[str, float]  # seconds on the critical path, sums to latency_s
    unit_busy: dict[str, float]  # seconds each unit is busy (overlapping)
    energy_j: float
    energy_phases: dict[str, float]  # sums to energy_j
    energy_units: dict[str, float]  # sums to energy_j
    flops: float
    dram_bytes: float
    link_bytes: float  # bytes over the link (at access granularity)
    link_commands: float
    selected_ratio: float
    offloaded_tokens: int
    roofline_fraction: float
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- helpers
def _roof(flops: float, nbytes: float, hw: Hardware) -> float:
    return max(flops / (hw.peak_flops * hw.compute_util), nbytes / (hw.dram_bw * hw.mem_eff))


def rows_per_stream(stage: Stage, model: ModelShape, wl: Workload) -> int:
    return {"frame": model.tokens_per_frame, "text": wl.question_tokens, "decode": 1}[stage]


def selected_ratio(method: Method, stage: Stage, n: int, c: Constants, stats: RetrievalStats) -> float:
    """Fraction of the past KV a step selects (per stream, averaged over layers and heads).

    Fixed top-k methods keep their ratio at every KV size. ReSV's WiCSum threshold is adaptive: the
    selected count grows as ``KV ** exponent`` (a fitted constant) from the ratio measured at
    ``ref_kv`` (COIN-length videos for the paper's ratios, the trace's mean KV for a trace).
    """
    if method.predictor == "none" or n <= 0:
        return 1.0
    base = method.frame_ratio if stage == "frame" else method.text_ratio
    if method.predictor == "resv":
        override = stats.frame_ratio if stage == "frame" else stats.text_ratio
        base = base if override is None else override
    if method.adaptive:
        ref = stats.ref_kv or c["ratio_ref_kv"]
        base *= (n / ref) ** (c["resv_growth_exponent"] - 1.0)
    return min(1.0, max(0.0, base))


@dataclass
class Transfer:
    seconds: float
    useful_bytes: float
    link_bytes: float
    runs: float
    commands: float


def transfer(hw: Hardware, method: Method, model: ModelShape, batch: int, n_off: float, sel_off: float,
             ratio: float, c: Constants, stats: RetrievalStats) -> Transfer:
    """One layer's prefetch of ``sel_off`` offloaded tokens per stream (of ``n_off`` offloaded).

    Layout: per KV head, tokens in a tier are contiguous in arrival order with K and V in separate
    regions (GPU runtimes), or cluster-contiguous with K and V interleaved (V-Rex's KVMU). Selected
    tokens form runs: the whole region for FlexGen; otherwise ``granule / (1 - density)`` tokens
    on average (granules picked independently), the granule being a cluster (KVMU), or at least
    one frame in arrival order (``locality_tokens``). A trace's measured run length overrides.
    """
    if sel_off <= 0:
        return Transfer(0.0, 0.0, 0.0, 0.0, 0.0)
    hk, tok = model.num_key_value_heads, model.head_dim * model.bytes_per_param  # K (or V), one head
    parts = 1 if method.kvmu else 2
    if method.granule == "all":
        run_tokens = sel_off
    else:
        g = {"cluster": stats.cluster_size, "frame": max(model.tokens_per_frame, c["locality_tokens"]),
             "token": c["locality_tokens"]}[method.granule]
        if stats.run_tokens and method.granule != "cluster":
            g = stats.run_tokens
        run_tokens = sel_off if ratio >= 1.0 else min(sel_off, g / (1.0 - ratio))
    run_bytes = run_tokens * tok * (2 if method.kvmu else 1)
    runs = batch * hk * parts * sel_off / run_tokens
    useful = batch * sel_off * model.kv_bytes_per_token_layer
    if hw.offload == "ssd":
        s = c.storage["ssd"]
        sector = s["sector_bytes"]
        aligned = method.kvmu or method.granule == "all"  # KVMU pads segments to sectors
        sectors = math.ceil(run_bytes / sector) if aligned else (run_bytes + sector - tok) / sector
        link_bytes = runs * sectors * sector
        commands = runs * max(1, math.ceil(run_bytes / s["max_transfer_bytes"]))
        bw = min(hw.link_bw * hw.link_eff, s["seq_read_gbps"] * 1e9)
        secs = max(link_bytes / bw, commands / s["read_iops"])
    else:
        h = c.storage["host"]
        g64 = h["access_bytes"]
        link_bytes = runs * math.ceil(run_bytes / g64) * g64
        commands = runs
        secs = link_bytes / (hw.link_bw * hw.link_eff) + runs * h["transfer_overhead_us"] * 1e-6
    return Transfer(secs, useful, link_bytes, runs, commands)


# ----------------------------------------------------------------------------- one step
def simulate_step(system: System, model: ModelShape, wl: Workload, stage: Stage,
                  stats: RetrievalStats = PAPER, c: Constants | None = None) -> StepResult:
    """Latency, breakdowns and energy of one step (see module doc)."""
    c = c or load_constants()
    hw, me = system.hw, system.method
    B, n, L = wl.batch, int(wl.kv_tokens), model.num_hidden_layers
    T = rows_per_stream(stage, model, wl)
    hq, hk, D, bpp = model.num_attention_heads, model.num_key_value_heads, model.head_dim, model.bytes_per_param
    kvl = model.kv_bytes_per_token_layer

    # --- execution of one layer
    f_qkv, b_qkv = 2.0 * B * T * model.qkv_params, model.qkv_params * bpp
    f_off, b_off = 2.0 * B * T * model.o_ffn_params, model.o_ffn_params * bpp
    r = selected_ratio(me, stage, n, c, stats)
    predicting = me.predictor != "none" and (stage != "frame" or me.predict_frames)
    n_att = (r if predicting else 1.0) * n + T  # selected past + the step's own tokens
    f_att, b_att = 4.0 * B * T * hq * D * n_att, B * n_att * kvl
    t_qkv, t_att, t_off = _roof(f_qkv, b_qkv, hw), _roof(f_att, b_att, hw), _roof(f_off, b_off, hw)
    exec_t = t_qkv + t_att + t_off

    # --- prediction (engine share and DRE share), split into the two retrieval phases
    pe_hash = pe_score = dre_hcu = dre_wtu = 0.0
    f_pred = b_pred = 0.0
    if predicting:
        ops = me.ops_per_layer * hw.op_overhead_s
        if me.predictor == "resv":
            n_cl = n / stats.cluster_size
            f_h = 2.0 * B * T * hk * D * c["n_hp"]
            f_s, b_s = 2.0 * B * T * hq * n_cl * D, B * stats.hc_overhead * n * kvl
            f_pred, b_pred = f_h + f_s, b_s
            if me.on_dre:
                freq_cores = hw.freq_hz * max(hw.cores, 1)
                scope = min(n, c["hc_scope_frames"] * model.tokens_per_frame) / stats.cluster_size
                steps = math.ceil(c["n_hp"] / 16)  # 16-input XOR/popcount
                dre_hcu = B * hk * T * (scope + T / 2) * steps / freq_cores
                row = 2 * math.ceil(n_cl / 16) + stats.scan_fraction * n_cl / 16 + c["wtu_refine_cycles"]
                dre_wtu = B * T * hq * row / freq_cores
                pe_hash, pe_score = _roof(f_h, 0.0, hw), _roof(f_s, b_s, hw)
            else:  # framework ops: clustering 131 of 239 (counted), the rest scoring/selection
                pe_hash = _roof(f_h, 0.0, hw) + ops * 131 / 239
                pe_score = _roof(f_s, b_s, hw) + ops * 108 / 239
        elif me.predictor == "infinigen":
            pd = D * me.partial_dim_frac
            f_pred, b_pred = 2.0 * B * T * hq * n * pd, B * n * hk * pd * bpp
            pe_score = _roof(f_pred, b_pred, hw) + ops
        elif me.predictor == "rekv":
            n_fr = n / model.tokens_per_frame
            f_pred, b_pred = 2.0 * B * hq * n_fr * D, B * n_fr * hk * D * bpp
            pe_score = _roof(f_pred, b_pred, hw) + ops

    # --- transfer of the selected offloaded tokens
    window = c["device_window_tokens"]
    n_off = max(0.0, n - window)
    sel_off = (r if predicting else 1.0) * n_off
    xf = transfer(hw, me, model, B, n_off, sel_off, r if predicting else 1.0, c, stats)

    # --- pipelined layer: engine does prediction then execution; DRE + link overlap execution
    side = dre_hcu + dre_wtu + xf.seconds
    exposed = max(0.0, side - exec_t)
    layer_t = pe_hash + pe_score + exec_t + exposed
    fill = 0.0
    if xf.seconds > 0:  # the first layer's retrieval has no previous layer to hide behind
        lat = c.storage["ssd"]["read_latency_us"] * 1e-6 if hw.offload == "ssd" else 2e-6
        fill = side + lat

    # --- per step: frame encoder and LM head
    t_vis = f_vis = b_vis = 0.0
    if stage == "frame" and wl.include_vision and model.vision is not None:
        f_vis, b_vis = B * model.vision.flops_per_frame(model.tokens_per_frame), model.vision.params * bpp
        t_vis = _roof(f_vis, b_vis, hw)
    f_lm, b_lm = 2.0 * B * model.lm_head_params, model.lm_head_params * bpp
    t_lm = _roof(f_lm, b_lm, hw)

    # --- critical-path phases (sum = latency)
    exp_dre = exposed * (dre_hcu + dre_wtu) / side if side > 0 else 0.0
    exp_dre_h = exp_dre * dre_hcu / (dre_hcu + dre_wtu) if dre_hcu + dre_wtu > 0 else 0.0
    phases = {
        "vision": t_vis,
        "qkv": L * t_qkv,
        "attention": L * t_att,
        "o_ffn": L * t_off,
        "hash_cluster": L * (pe_hash + exp_dre_h),
        "score_threshold": L * (pe_score + exp_dre - exp_dre_h),
        "transfer": L * (exposed - exp_dre) + fill,
        "lm_head": t_lm,
    }
    latency = sum(phases.values())

    # --- units (busy time; they overlap)
    link_busy = L * xf.seconds + (xf.seconds if fill else 0.0)
    engine = "LXE" if hw.kind == "vrex" else "GPU"
    unit_busy = {engine: t_vis + t_lm + L * (exec_t + pe_hash + pe_score), "link": link_busy}
    if hw.kind == "vrex":
        unit_busy.update({"HCU": L * dre_hcu, "WTU": L * dre_wtu, "KVMU": link_busy if me.kvmu else 0.0})

    # --- energy: platform power over the step + link + offload tier
    st = c.storage
    e_link = hw.lanes * st["link"]["pcie_w_per_lane"] * link_busy
    xfer_bytes = L * xf.link_bytes
    e_tier = st["ssd"]["active_w"] * link_busy if hw.offload == "ssd" else xfer_bytes * 8 * st["host"]["pj_per_bit"] * 1e-12
    e_board = hw.power_w * latency
    energy = e_board + e_link + e_tier
    e_ph = {k: hw.power_w * v for k, v in phases.items()}
    e_ph["transfer"] += e_link + e_tier
    tier_name = "SSD" if hw.offload == "ssd" else "host DRAM"
    if hw.kind == "vrex":
        ap = c.area_power
        cores = hw.cores
        units_mw = {k: v["power_mw"] for k, v in ap["units"].items()}
        core_w = ap["core"]["power_mw"] / 1000 * cores
        e_units = {"LXE": (core_w - sum(units_mw.values()) / 1000 * cores) * latency}
        e_units.update({k.upper(): v / 1000 * cores * latency for k, v in units_mw.items()})
        e_units["DRAM + I/O + rest"] = (hw.power_w - core_w) * latency
    else:
        e_units = {f"{hw.label} board": e_board}
    e_units["PCIe"] = e_link
    e_units[tier_name] = e_tier

    # --- roofline fraction of the step
    flops = L * (f_qkv + f_off + f_att + f_pred) + f_vis + f_lm
    dram = L * (b_qkv + b_off + b_att + b_pred + xf.useful_bytes) + b_vis + b_lm
    oi = flops / dram if dram else float("inf")
    bound = min(hw.peak_flops, oi * hw.dram_bw)
    return StepResult(
        system=system.name, stage=stage, kv_tokens=n, batch=B, latency_s=latency, phases=phases,
        unit_busy=unit_busy, energy_j=energy, energy_phases=e_ph, energy_units=e_units, flops=flops,
        dram_bytes=dram, link_bytes=xfer_bytes, link_commands=L * xf.commands, selected_ratio=r if predicting else 1.0,
        offloaded_tokens=int(n_off), roofline_fraction=(flops / latency) / bound if latency else 0.0,
        extra={"layer_s": layer_t, "exec_s": exec_t, "retrieval_side_s": side, "fill_s": fill,
               "fits_dram": float(model.weight_bytes + B * min(n, window) * model.kv_bytes_per_token <= hw.dram_bytes)},
    )


def simulate(system: str | System, model: str | ModelShape, wl: Workload, stats: RetrievalStats = PAPER,
             c: Constants | None = None, fitted: dict[str, float] | None = None) -> dict[str, StepResult]:
    """Frame step, question prefill and one decode step (TPOT) of a system."""
    fitted = load_fitted() if fitted is None else fitted
    sys_ = load_system(system, fitted) if isinstance(system, str) else system
    m = resolve(model)
    c = c or load_constants(fitted)
    return {s: simulate_step(sys_, m, wl, s, stats, c) for s in ("frame", "text", "decode")}


def episode(steps: dict[str, StepResult], wl: Workload) -> dict[str, float]:
    """One question episode per stream at this KV size: ``frames`` frame steps, the question
    prefill and ``answer_tokens`` decode steps (the paper's average COIN case: 26 / 25 / 39).
    The KV size is held at ``kv_tokens`` throughout (a short episode on a long stream)."""
    f, q, d = steps["frame"], steps["text"], steps["decode"]
    lat = wl.frames * f.latency_s + q.latency_s + wl.answer_tokens * d.latency_s
    en = wl.frames * f.energy_j + q.energy_j + wl.answer_tokens * d.energy_j
    return {"latency_s": lat, "energy_j_per_stream": en / wl.batch,
            "frame_share": wl.frames * f.latency_s / lat, "decode_share": wl.answer_tokens * d.latency_s / lat}


__all__ = ["Stage", "PHASES", "Workload", "StepResult", "Transfer", "selected_ratio", "transfer",
           "simulate_step", "simulate", "episode", "rows_per_stream"]
