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

Plus, per step, the frame encoder (``frame`` steps) and the LM head. Matrix products take their time
from their shapes (:mod:`vrex.hw.compute`: tiling on the LXE's 64x64 DPE, published GEMM efficiency
and tile/wave quantisation on GPUs); the DRE's HCU/WTU cycles come from the bit-exact units
(:mod:`vrex.hw.dre`); the device keeps what fits (:mod:`vrex.hw.capacity`); energy is
activity-based (:mod:`vrex.hw.energy`). Every constant is named in ``configs/`` and ``docs/hw.md``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from . import compute as cp
from .capacity import place
from .config import Constants, Hardware, Method, System, load_constants, load_fitted, load_system
from .dre import DRESample, UnitCycles, kvmu_run_tokens, sampled_cycles, unit_cycles
from .energy import Activity, step_energy
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
    roofline_fraction: float  # the paper's: attention + retrieval on the link-aware roofline
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- helpers
def rows_per_stream(stage: Stage, model: ModelShape, wl: Workload) -> int:
    return {"frame": model.tokens_per_frame, "text": wl.question_tokens, "decode": 1}[stage]


def selected_ratio(method: Method, stage: Stage, n: int, c: Constants, stats: RetrievalStats) -> float:
    """Fraction of the past KV a step selects (per stream, averaged over layers and heads).

    Fixed top-k methods keep their ratio at every KV size. ReSV's WiCSum threshold is adaptive: the
    selected count grows as ``KV ** exponent`` (``resv_growth_exponent``, or the trace's measured
    slope) from the ratio measured at ``ref_kv`` (COIN-length videos for the paper's ratios, the
    trace's mean KV for a trace).
    """
    if method.predictor == "none" or n <= 0:
        return 1.0
    base = method.frame_ratio if stage == "frame" else method.text_ratio
    if method.predictor == "resv":
        override = stats.frame_ratio if stage == "frame" else stats.text_ratio
        base = base if override is None else override
    if method.adaptive:
        ref = stats.ref_kv or c["ratio_ref_kv"]
        gamma = stats.growth_exponent if stats.growth_exponent is not None else c["resv_growth_exponent"]
        base *= (n / ref) ** (gamma - 1.0)
    return min(1.0, max(0.0, base))


@dataclass
class Transfer:
    seconds: float
    useful_bytes: float
    link_bytes: float
    runs: float
    commands: float


def transfer(hw: Hardware, method: Method, model: ModelShape, batch: int, n_off: float, sel_off: float,
             ratio: float, c: Constants, stats: RetrievalStats, kv_scale: float = 1.0,
             device_tokens: int | None = None) -> Transfer:
    """One layer's prefetch of ``sel_off`` offloaded tokens per stream (of ``n_off`` offloaded, with
    ``device_tokens`` on the device: default the device window).

    Layout: per KV head, tokens in a tier are contiguous in arrival order with K and V in separate
    regions (GPU runtimes), or cluster-contiguous with K and V interleaved (V-Rex's KVMU). Selected
    tokens form runs: the whole region for FlexGen; with the KVMU, the mean run the bit-exact unit
    produces on a sampled stream of the step's shape (:func:`vrex.hw.dre.kvmu_run_tokens`: clusters
    cut at the edges of the regrouped chunks included); otherwise ``granule / (1 - density)`` tokens
    on average (granules picked independently), the granule being at least one frame in arrival
    order (``locality_tokens``). A trace's measured run length overrides the arrival-order model.
    """
    if sel_off <= 0:
        return Transfer(0.0, 0.0, 0.0, 0.0, 0.0)
    hk, tok = model.num_key_value_heads, model.head_dim * model.bytes_per_param * kv_scale  # K (or V), one head
    parts = 1 if method.kvmu else 2
    if method.granule == "all":
        run_tokens = sel_off
    else:
        g = {"cluster": stats.cluster_size, "frame": max(model.tokens_per_frame, c["locality_tokens"]),
             "token": c["locality_tokens"]}[method.granule]
        if stats.run_tokens and method.granule != "cluster":
            g = stats.run_tokens
        run_tokens = sel_off if ratio >= 1.0 else min(sel_off, g / (1.0 - ratio))
        if method.kvmu and ratio < 1.0:
            dev = int(c["device_window_tokens"]) if device_tokens is None else int(device_tokens)
            unit = kvmu_run_tokens(int(round(n_off)), dev, round(ratio, 4), round(stats.cluster_size, 1),
                                   model.tokens_per_frame, int(c["hc_scope_frames"]), int(c["kvmu_live_clusters"]))
            if unit is not None:  # (None: the sample's selection never left the device; keep the formula)
                run_tokens = min(sel_off, unit)
    run_bytes = run_tokens * tok * (2 if method.kvmu else 1)
    runs = batch * hk * parts * sel_off / run_tokens
    useful = batch * sel_off * model.kv_bytes_per_token_layer * kv_scale
    if hw.offload == "ssd":
        s = c.storage["ssd"]
        sector = s["sector_bytes"]
        aligned = method.kvmu or method.granule == "all"  # KVMU pads segments to sectors
        if aligned:  # runs are whole tokens: a token of whole sectors (512 B: K + V of one Llama head)
            # pads nothing; otherwise the last sector is half empty on average. (The ceiling of the
            # *mean* run charged up to a sector per run, and jumped as the unit's mean run moved.)
            slot = tok * (2 if method.kvmu else 1)
            sectors = run_bytes / sector + (0.0 if slot % sector == 0 else 0.5)
        else:  # a run starts at any token of a sector
            sectors = (run_bytes + sector - tok) / sector
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
LLM_OPS_PER_LAYER = 70  # aten ops of one transformers Llama decoder layer (eager, sdpa), counted with
#                         TorchDispatchMode: the host-side floor of a GPU layer (launches are async)


def host_ops_time(me: Method, hw: Hardware, clustering: bool = False) -> float:
    """Host-side seconds of a method's eager prediction ops per layer (all of them, or the hashing +
    clustering ones): every op costs the host ``op_overhead_s`` (Python glue, dispatch, launch), and
    every *synchronising* op (``nonzero``, ``.item()``, boolean indexing: output size depends on data)
    also waits ``sync_s`` for the device round trip -- the last kernel's launch latency, its run and
    the completion signal (plus the small device-to-host copy) -- during which neither side works."""
    if clustering:
        return me.clustering_ops_per_layer * hw.op_overhead_s + me.clustering_syncs_per_layer * hw.sync_s
    return me.ops_per_layer * hw.op_overhead_s + me.syncs_per_layer * hw.sync_s


def _vision(hw: Hardware, model: ModelShape, B: int) -> tuple[cp.Work, float]:
    """Frame encoder of ``B`` frames (dense layers share weights across the batch) + VPE seconds."""
    v = model.vision
    if v is None:
        return cp.ZERO, 0.0
    n, d, f, hd, e = v.num_patches, v.hidden_size, v.intermediate_size, v.head_dim, hw.vision_eff
    w = cp.matmul(hw, B * n, v.patch_dim, d, eff=e)
    layer = (cp.matmul(hw, B * n, d, 3 * d, eff=e) + cp.matmul(hw, B * n, d, d, eff=e) + cp.matmul(hw, B * n, d, f, eff=e)
             + cp.matmul(hw, B * n, f, d, eff=e) + cp.matmul(hw, n, hd, n, count=B * v.num_heads, weight_bytes=n * hd * 2, eff=e)
             + cp.matmul(hw, n, n, hd, count=B * v.num_heads, weight_bytes=n * hd * 2, eff=e))
    w = w + layer.scaled(v.num_hidden_layers)
    for a, b in zip(v.connector, v.connector[1:]):
        w = w + cp.matmul(hw, B * model.tokens_per_frame, a, b)
    vpe = cp.vpe(hw, v.num_hidden_layers * B * (v.num_heads * n * n + n * (f + 2 * d)))
    return w + vpe, vpe.seconds


def _dre_cycles(model: ModelShape, n: int, T: int, stats: RetrievalStats, c: Constants,
                dre: DRESample | None) -> UnitCycles:
    """One KV head's HCU and WTU cycles for one layer: the bit-exact units on ``dre`` or on a sample."""
    if dre is not None:
        return unit_cycles(dre)
    g = model.num_attention_heads // model.num_key_value_heads
    cs = max(1.0, stats.cluster_size)
    n_cl = int(round(n / cs))
    scope = int(round(min(n, c["hc_scope_frames"] * model.tokens_per_frame) / cs))
    return sampled_cycles(n_cl, scope, T, T * g, model.head_dim, int(c["n_hp"]), round(cs, 1))


def simulate_step(system: System, model: ModelShape, wl: Workload, stage: Stage,
                  stats: RetrievalStats = PAPER, c: Constants | None = None, dre: DRESample | None = None) -> StepResult:
    """Latency, breakdowns and energy of one step (see module doc). ``dre``: the DRE units' inputs
    for one KV head of one layer (default: a sample of the step's shape, :mod:`vrex.hw.dre`)."""
    c = c or load_constants()
    hw, me = system.hw, system.method
    B, n, L = wl.batch, int(wl.kv_tokens), model.num_hidden_layers
    T = rows_per_stream(stage, model, wl)
    hq, hk, D, bpp = model.num_attention_heads, model.num_key_value_heads, model.head_dim, model.bytes_per_param
    g, d = hq // hk, model.hidden_size
    kv_scale = me.kv_bits / (8 * bpp)
    pl = place(hw, me, model, B, n, c)

    # --- execution of one layer
    r = selected_ratio(me, stage, n, c, stats)
    predicting = me.predictor != "none" and (stage != "frame" or me.predict_frames)
    n_att = (r if predicting else 1.0) * n + T  # selected past + the step's own tokens
    na = int(math.ceil(n_att))
    w_qkv = cp.matmul(hw, B * T, d, (hq + 2 * hk) * D)
    w_att = (cp.matmul(hw, T * g, D, na, count=B * hk, weight_bytes=n_att * D * bpp * kv_scale)
             + cp.matmul(hw, T * g, na, D, count=B * hk, weight_bytes=n_att * D * bpp * kv_scale))
    w_att = w_att + cp.vpe(hw, B * T * hq * n_att)  # softmax on the VPE
    on_cpu = me.cpu_attention and hw.host_cpu_flops > 0 and pl.offloaded_tokens > 0
    if on_cpu:  # FlexGen's CPU delegation: the KV arrives in host memory, attention runs on the CPU
        t_cpu = max(w_att.flops / hw.host_cpu_flops, w_att.dram_bytes / hw.host_cpu_bw)
        w_att = cp.Work(t_cpu, w_att.flops, w_att.dram_bytes, t_cpu)
    w_off = (cp.matmul(hw, B * T, hq * D, d) + cp.matmul(hw, B * T, d, 2 * model.intermediate_size)
             + cp.matmul(hw, B * T, model.intermediate_size, d))
    exec_t = w_qkv.seconds + w_att.seconds + w_off.seconds
    host_floor = LLM_OPS_PER_LAYER * hw.op_overhead_s  # GPU: the host cannot launch faster than this
    host_pad = max(0.0, host_floor - exec_t)

    # --- prediction (engine share and DRE share), split into the two retrieval phases
    pe_hash = pe_score = dre_hcu = dre_wtu = 0.0
    w_hash = w_score = cp.ZERO
    cyc = UnitCycles(0.0, 0.0, 0.0)
    if predicting:
        ops = host_ops_time(me, hw)
        if me.predictor == "resv":
            n_cl = max(1, int(round(n / stats.cluster_size)))
            hc_bytes = stats.hc_overhead * n * model.kv_bytes_per_token_layer / hk
            w_hash = cp.matmul(hw, B * T, D, int(c["n_hp"]), count=hk)
            w_score = cp.matmul(hw, T * g, D, n_cl, count=B * hk, weight_bytes=hc_bytes)
            pe_hash, pe_score = w_hash.seconds, w_score.seconds
            if me.on_dre:
                cyc = _dre_cycles(model, n, T, stats, c, dre)
                freq_cores = hw.freq_hz * max(hw.cores, 1)  # KV heads spread over the cores' DREs
                dre_hcu, dre_wtu = B * hk * cyc.hcu / freq_cores, B * hk * cyc.wtu / freq_cores
            else:  # framework ops (counted by vrex.hw.opcount): clustering, then scoring/selection
                cl = host_ops_time(me, hw, clustering=True)
                pe_hash += cl
                pe_score += ops - cl
        elif me.predictor == "infinigen":
            pd = max(1, int(round(D * me.partial_dim_frac)))
            w_score = cp.matmul(hw, T * g, pd, max(n, 1), count=B * hk, weight_bytes=n * pd * bpp)
            pe_score = w_score.seconds + ops
        elif me.predictor == "rekv":
            n_fr = max(1, n // model.tokens_per_frame)
            w_score = cp.matmul(hw, g, D, n_fr, count=B * hk, weight_bytes=n_fr * D * bpp)
            pe_score = w_score.seconds + ops

    # --- transfer of the selected offloaded tokens (capacity decides what is offloaded)
    n_off = pl.offloaded_tokens
    sel_off = (r if predicting else 1.0) * n_off
    xf = transfer(hw, me, model, B, n_off, sel_off, r if predicting else 1.0, c, stats, kv_scale, pl.device_tokens)

    # --- pipelined layer: engine does prediction then execution; DRE + link overlap execution
    sched = me.sched_tasks_per_layer * hw.op_overhead_s  # synchronised host scheduling (FlexGen)
    busy = exec_t + host_pad
    side = dre_hcu + dre_wtu + xf.seconds
    exposed = max(0.0, side - busy)
    layer_t = pe_hash + pe_score + busy + exposed + sched
    fill = 0.0
    if xf.seconds > 0:  # the first layer's retrieval has no previous layer to hide behind
        fill = side + c.storage["ssd" if hw.offload == "ssd" else "host"]["read_latency_us"] * 1e-6

    # --- per step: frame encoder and LM head
    w_vis = cp.ZERO
    if stage == "frame" and wl.include_vision and model.vision is not None:
        w_vis, _ = _vision(hw, model, B)
    w_lm = cp.matmul(hw, B, d, model.vocab_size)

    # --- critical-path phases (sum = latency)
    exp_dre = exposed * (dre_hcu + dre_wtu) / side if side > 0 else 0.0
    exp_dre_h = exp_dre * dre_hcu / (dre_hcu + dre_wtu) if dre_hcu + dre_wtu > 0 else 0.0
    phases = {
        "vision": w_vis.seconds,
        "qkv": L * (w_qkv.seconds + host_pad + sched),
        "attention": L * w_att.seconds,
        "o_ffn": L * w_off.seconds,
        "hash_cluster": L * (pe_hash + exp_dre_h),
        "score_threshold": L * (pe_score + exp_dre - exp_dre_h),
        "transfer": L * (exposed - exp_dre) + fill,
        "lm_head": w_lm.seconds,
    }
    latency = sum(phases.values())

    # --- units (busy time; they overlap)
    link_busy = L * xf.seconds + (xf.seconds if fill else 0.0)
    engine = "LXE" if hw.kind == "vrex" else "GPU"
    unit_busy = {engine: w_vis.seconds + w_lm.seconds + L * (exec_t + pe_hash + pe_score), "link": link_busy}
    if hw.kind == "vrex" and hw.dre:
        unit_busy.update({"HCU": L * dre_hcu, "WTU": L * dre_wtu, "KVMU": link_busy if me.kvmu else 0.0})

    # --- energy from activity
    # each phase's work for the whole step: (work of one instance, instances)
    works = {"vision": (w_vis, 1), "qkv": (w_qkv, L), "attention": (w_att, L), "o_ffn": (w_off, L),
             "hash_cluster": (w_hash, L), "score_threshold": (w_score, L), "lm_head": (w_lm, 1)}

    def per_phase(attr: str) -> dict[str, float]:
        return {p: k * getattr(w, attr) for p, (w, k) in works.items()}

    act = Activity(
        flops=per_phase("flops"), sram_bytes=per_phase("sram_bytes"),
        dram_bytes={**per_phase("dram_bytes"), "transfer": L * xf.useful_bytes},  # fetched KV is written into device DRAM
        wait_s=phases["transfer"], link_busy_s=link_busy, link_bytes=L * xf.link_bytes,
        hcu_busy_s=L * dre_hcu, wtu_busy_s=L * dre_wtu)
    energy, e_ph, e_units = step_energy(hw, c, phases, act)

    # --- the paper's roofline: attention + retrieval, bounded by DRAM and by the link
    f_ar = L * (w_att.flops + w_hash.flops + w_score.flops)
    d_ar = L * (w_att.dram_bytes + w_hash.dram_bytes + w_score.dram_bytes)
    l_ar = L * xf.link_bytes
    # time these operations occupy: attention + prediction on the engine, overlapped per layer with the
    # DRE + link (the pipeline above), plus the exposed first-layer fill; the roof is that of the engine
    # the attention ran on (the host CPU under FlexGen's delegation)
    t_ar = L * max(w_att.seconds + pe_hash + pe_score, side) + (fill - side if fill else 0.0)
    peak, dbw = (hw.host_cpu_flops / max(hw.host_cpu_eff, 1e-9), hw.host_cpu_bw) if on_cpu else (hw.peak_flops, hw.dram_bw)
    bound = min(peak, f_ar / d_ar * dbw if d_ar else math.inf, f_ar / l_ar * hw.link_bw if l_ar else math.inf)
    roof = (f_ar / t_ar) / bound if t_ar > 0 and f_ar > 0 else 0.0
    flops = sum(act.flops.values())
    dram = sum(act.dram_bytes.values())
    sram = sum(act.sram_bytes.values())
    return StepResult(
        system=system.name, stage=stage, kv_tokens=n, batch=B, latency_s=latency, phases=phases,
        unit_busy=unit_busy, energy_j=energy, energy_phases=e_ph, energy_units=e_units, flops=flops,
        dram_bytes=dram, link_bytes=L * xf.link_bytes, link_commands=L * xf.commands,
        selected_ratio=r if predicting else 1.0, offloaded_tokens=int(n_off), roofline_fraction=roof,
        extra={"layer_s": layer_t, "exec_s": exec_t, "retrieval_side_s": side, "fill_s": fill,
               "fits_dram": float(pl.fits), "device_tokens": float(pl.device_tokens), "spills": float(pl.spills),
               "kv_budget_gb": pl.budget_bytes / 1e9, "free_gb": pl.free_bytes / 1e9,
               "sram_bytes": sram, "hcu_cycles": float(B * hk * cyc.hcu), "wtu_cycles": float(B * hk * cyc.wtu),
               "wtu_scan_fraction": cyc.scan_fraction, "oi_link": f_ar / l_ar if l_ar else math.inf,
               "attained_ar_tflops": f_ar / t_ar / 1e12 if t_ar else 0.0,
               "util_vision": cp.utilisation(w_vis, hw), "util_qkv": cp.utilisation(w_qkv, hw),
               "util_o_ffn": cp.utilisation(w_off, hw),
               "step_roofline": (flops / latency) / min(hw.peak_flops, flops / dram * hw.dram_bw) if latency and dram else 0.0},
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
           "simulate_step", "simulate", "episode", "rows_per_stream", "host_ops_time", "LLM_OPS_PER_LAYER"]
