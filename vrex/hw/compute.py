"""Execution time of matrix products from their shapes (no fitted utilisation).

* **V-Rex / LPU (LXE)**: each core's DPE is 64 MAC trees of 64 inputs (V-Rex §IV-A, Table III): per
  cycle it multiplies one 64-long input slice by a 64x64 weight tile. An ``M x K @ K x N`` product
  takes ``M * ceil(K/64) * ceil(N/64)`` tile-cycles, the ``ceil(N/64)`` column tiles spread over the
  cores (``ceil(ceil(N/64) / cores)`` per core): padding and core imbalance are the only losses.
  Weights stream from DRAM once; activations are re-streamed once per pass of resident weight
  columns (a core holds ``SRAM/2 / (2K)`` columns of 384 KB), which is the cheaper dataflow for
  every shape here. Time = ``max(cycles / f, DRAM bytes / (BW * mem_eff))``.
* **GPUs**: ``FLOPs / (peak * gemm_eff * tile_eff)`` with ``gemm_eff`` the achievable fraction of
  peak on large FP16 GEMMs (published measurements, ``hardware/*.yaml``) and ``tile_eff`` the
  padding of 128x128 output tiles (64 rows when ``M <= 64``) and the wave quantisation of tiles over
  the SMs; memory side as above.

Vector work (softmax, norms, activations) runs on the V-Rex core's 64-lane VPE
(:func:`vpe_time`); on GPUs it is fused or memory-bound and folded into the GEMMs' memory side.

**LXE SRAM traffic** (V-Rex / LPU; what ``energy.py`` charges per byte): every DRAM byte crosses the
SRAM once (written on the way in, read on the way out for results); the DPE then reads each weight
(or KV) byte once into its trees (weight-stationary: a 64x64 tile serves all ``M`` rows), one
64-element input slice per DPE cycle (``TREE x bpp`` bytes, the stream the DPE needs at full rate)
and writes each output once; the VPE reads and writes each element it touches once. GPUs: 0 (their
on-chip memories are inside the measured board power).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import CONFIG_DIR, Hardware, read_yaml

TREE = 64  # DPE: 64 MAC trees x 64 inputs per core (Table III)
VPE_LANES = 64  # VPE: 1 x 64 per core
SRAM_BYTES = 384 * 1024  # LXE SRAM per core (Table III)
# [U] VPE lane-cycles per softmax/norm element (configs/constants.yaml, with its reason)
VPE_OPS_PER_ELEMENT = float(read_yaml(CONFIG_DIR / "constants.yaml")["vpe_ops_per_element"])
VPE_SRAM_BYTES_PER_ELEMENT = 4  # one BF16 read + one BF16 write per element the VPE touches


@dataclass(frozen=True)
class Work:
    """One phase's cost on the engine: seconds, FLOPs, DRAM bytes, the compute-bound time, and the
    bytes read from and written to the LXE's SRAM (0 on GPUs)."""

    seconds: float
    flops: float
    dram_bytes: float
    compute_s: float
    sram_bytes: float = 0.0

    def __add__(self, o: "Work") -> "Work":
        return Work(self.seconds + o.seconds, self.flops + o.flops, self.dram_bytes + o.dram_bytes, self.compute_s + o.compute_s,
                    self.sram_bytes + o.sram_bytes)

    def scaled(self, k: float) -> "Work":
        return Work(self.seconds * k, self.flops * k, self.dram_bytes * k, self.compute_s * k, self.sram_bytes * k)


ZERO = Work(0.0, 0.0, 0.0, 0.0)


def _ceil(a: float, b: float) -> int:
    return int(math.ceil(a / b)) if a > 0 else 0


def lxe_cycles(M: int, K: int, N: int, cores: int, count: float = 1.0) -> int:
    """DPE cycles of ``count`` products ``M x K @ K x N`` on ``cores`` cores (the ``count x ceil(N/64)``
    column tiles are split over the cores)."""
    if min(M, K, N) <= 0 or count <= 0:
        return 0
    return M * _ceil(K, TREE) * _ceil(_ceil(N, TREE) * count, cores)


def gpu_tile_eff(M: int, N: int, sms: int) -> float:
    """Fraction of the issued tile work that is useful: tile padding x wave quantisation."""
    if min(M, N) <= 0:
        return 1.0
    tm, tn = (64 if M <= 64 else 128), 128
    tiles = _ceil(M, tm) * _ceil(N, tn)
    pad = (M * N) / (_ceil(M, tm) * tm * _ceil(N, tn) * tn)
    waves = _ceil(tiles, max(sms, 1))
    return pad * tiles / (waves * max(sms, 1))


def matmul(hw: Hardware, M: int, K: int, N: int, count: float = 1.0, weight_bytes: float | None = None,
           bpp: int = 2, eff: float = 1.0) -> Work:
    """``count`` independent ``M x K @ K x N`` products; ``weight_bytes`` overrides the B operand's bytes
    (e.g. a KV cache read once per stream, quantised KV); ``eff`` scales the compute side (the
    frame encoder's achieved fraction of the tiling bound, ``Hardware.vision_eff``)."""
    if min(M, K, N) <= 0 or count <= 0:
        return ZERO
    flops = 2.0 * M * K * N * count
    wb = (K * N * bpp if weight_bytes is None else weight_bytes) * count
    sram = 0.0
    if hw.kind == "vrex":
        t_c = lxe_cycles(M, K, N, hw.cores, count) / (hw.freq_hz * eff)
        cols_per_pass = max(TREE, (SRAM_BYTES // 2) // (K * bpp)) * hw.cores
        act = M * K * bpp * _ceil(N, cols_per_pass) * count + M * N * bpp * count
        # fill/drain of every DRAM byte + weights into the trees + one 64-element input slice per busy
        # DPE cycle (row x K-slice x column tile) + outputs
        slices = M * _ceil(K, TREE) * _ceil(N, TREE) * count
        sram = (wb + act) + wb + slices * TREE * bpp + M * N * bpp * count
    else:
        t_c = flops / (hw.peak_flops * hw.gemm_eff * gpu_tile_eff(M, N, hw.sms) * eff)
        act = (M * K + M * N) * bpp * count
    nbytes = wb + act
    t_m = nbytes / (hw.dram_bw * hw.mem_eff)
    return Work(max(t_c, t_m), flops, nbytes, t_c, sram)


def vpe_time(hw: Hardware, elements: float) -> float:
    """Seconds of vector work on the VPEs (V-Rex/LPU); 0 on GPUs (fused into the kernels)."""
    if hw.kind != "vrex" or elements <= 0:
        return 0.0
    return elements * VPE_OPS_PER_ELEMENT / (VPE_LANES * hw.cores * hw.freq_hz)


def vpe(hw: Hardware, elements: float) -> Work:
    """Vector work on the VPEs as a phase cost (its seconds count as compute; its SRAM traffic one
    BF16 read and one write per element); :data:`ZERO` on GPUs."""
    t = vpe_time(hw, elements)
    if t <= 0:
        return ZERO
    return Work(t, 0.0, 0.0, t, elements * VPE_SRAM_BYTES_PER_ELEMENT)


def utilisation(work: Work, hw: Hardware) -> float:
    """Attained fraction of Table I's peak over the phase."""
    return work.flops / (work.seconds * hw.peak_flops) if work.seconds > 0 else 0.0


__all__ = ["Work", "ZERO", "TREE", "lxe_cycles", "gpu_tile_eff", "matmul", "vpe_time", "vpe", "utilisation"]
