"""What a measured latency implies: the model inverted for the selected share of the KV.

Used to judge the calibration figures the model misses (docs/hw.md, "Reading the table"): for a
paper latency at one KV size, bisect on ReSV's frame ratio (every other term fixed) for the share of
the past KV that would make the simulated step take that long, then express it as the growth
exponent it implies from the paper's ratio at COIN length (``selected = r0 * ref * (n / ref) ** γ``).
A point whose implied exponent is far from its neighbours' cannot be met by a smooth selection law.

``python -m vrex.hw.invert`` prints the table for V-Rex8's calibration points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .config import Constants, System, load_constants, load_fitted, load_method, load_system
from .model_shapes import ModelShape, preset
from .sim import Stage, Workload, simulate_step
from .stats import PAPER


@dataclass(frozen=True)
class Implied:
    kv: int
    latency_s: float  # the target
    ratio: float | None  # None: the target is outside what any ratio in [0, 1] gives
    floor_s: float  # latency with nothing selected
    ceiling_s: float  # latency with everything selected

    @property
    def selected_tokens(self) -> float | None:
        return None if self.ratio is None else self.ratio * self.kv


def step_latency(system: System, model: ModelShape, kv: int, ratio: float, stage: Stage = "frame",
                 batch: int = 1, c: Constants | None = None) -> float:
    """Simulated latency when ReSV selects exactly ``ratio`` of the past KV at ``kv`` tokens."""
    st = replace(PAPER, frame_ratio=ratio, text_ratio=ratio, ref_kv=float(kv), growth_exponent=1.0)
    return simulate_step(system, model, Workload(kv, batch), stage, st, c).latency_s


def implied_ratio(system: System, model: ModelShape, kv: int, latency_s: float, stage: Stage = "frame",
                  c: Constants | None = None, iters: int = 50) -> Implied:
    """Bisection for the ratio whose simulated latency equals ``latency_s`` (latency is non-decreasing
    in the ratio: more selected tokens never take less time)."""
    if system.method.predictor != "resv":
        raise ValueError(f"implied_ratio needs a ReSV system, got method {system.method.name!r}")
    lo_t, hi_t = step_latency(system, model, kv, 0.0, stage, c=c), step_latency(system, model, kv, 1.0, stage, c=c)
    if not lo_t <= latency_s <= hi_t:
        return Implied(kv, latency_s, None, lo_t, hi_t)
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if step_latency(system, model, kv, mid, stage, c=c) < latency_s:
            lo = mid
        else:
            hi = mid
    return Implied(kv, latency_s, 0.5 * (lo + hi), lo_t, hi_t)


def implied_exponent(selected_tokens: float, kv: float, ref_ratio: float, ref_kv: float) -> float:
    """γ of ``selected = ref_ratio * ref_kv * (kv / ref_kv) ** γ`` through one point."""
    if min(selected_tokens, kv, ref_ratio, ref_kv) <= 0 or kv == ref_kv:
        raise ValueError("implied_exponent needs positive values and kv != ref_kv")
    return math.log(selected_tokens / (ref_ratio * ref_kv)) / math.log(kv / ref_kv)


PAPER_VREX8_FRAME_MS = {1000: 121.0, 5000: 123.0, 10000: 198.0, 20000: 200.0, 40000: 254.0}


def main() -> None:
    fitted = load_fitted()
    sys_, model, c = load_system("vrex8", fitted), preset("llama3-8b"), load_constants(fitted)
    r0, ref = load_method("resv_dre").frame_ratio, c["ratio_ref_kv"]
    print(f"V-Rex8 frame step: selected share implied by the paper's latency (anchor {r0:.1%} at {ref:.0f} tokens)")
    for kv, ms in PAPER_VREX8_FRAME_MS.items():
        im = implied_ratio(sys_, model, kv, ms * 1e-3, c=c)
        if im.ratio is None:
            print(f"{kv:>6} tokens, {ms:.0f} ms: outside [{im.floor_s * 1e3:.1f}, {im.ceiling_s * 1e3:.1f}] ms")
            continue
        g = implied_exponent(im.selected_tokens, kv, r0, ref)
        # how sharply the point pins the ratio: the ratios within +-2% of the target latency
        band = [implied_ratio(sys_, model, kv, ms * f * 1e-3, c=c) for f in (0.98, 1.02)]
        lo = 0.0 if band[0].ratio is None else band[0].ratio
        hi = 1.0 if band[1].ratio is None else band[1].ratio
        print(f"{kv:>6} tokens, {ms:.0f} ms: ratio {im.ratio:.3f} = {im.selected_tokens:,.0f} tokens, gamma {g:.2f}"
              f" (+-2% of the latency: ratio {lo:.3f}-{hi:.3f})")


if __name__ == "__main__":
    main()


__all__ = ["Implied", "step_latency", "implied_ratio", "implied_exponent", "PAPER_VREX8_FRAME_MS"]
