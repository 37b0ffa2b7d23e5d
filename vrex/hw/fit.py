"""Fit the simulator's free constants on the calibration figures only, and write ``configs/fitted.yaml``.

Issue #4 allows fitting only on the V-Rex8 batch-1 per-frame latencies and the per-frame speedups
over AGX Orin + FlexGen; those are the figures marked ``fit: true`` in ``paper_figures.yaml`` and
the only ones this module reads. The fitted constants (everything else is a datasheet value or an
a-priori assumption):

* ``u_lxe``  -- LXE compute utilisation in GEMM-heavy phases (frame encoder, prefill);
* ``u_gpu``  -- GPU compute utilisation in the same phases (FlexGen/PyTorch on the Orin);
* ``device_window_tokens`` -- recent KV kept in accelerator memory per stream (the paper's
  unstated "predefined maximum capacity"); older KV is offloaded;
* ``resv_growth_exponent`` -- ReSV's selected tokens grow as ``KV ** exponent``.

Objective: the worst relative error over the calibration figures (issue #4's goal is "every figure
within 25%", so the fit is minimax), plus 1e-3 x the mean squared relative error as a tie-breaker;
minimised with a plain Nelder-Mead (no SciPy dependency) from a fixed grid of starts, the best
then refined. Run: ``python -m vrex.hw.fit`` (about a minute).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import date

import yaml

from .check import Evaluator, figures
from .config import FITTED_PATH

PARAMS = ("u_lxe", "u_gpu", "device_window_tokens", "resv_growth_exponent")
DESCRIPTIONS = {
    "u_lxe": "LXE compute utilisation in GEMM-heavy phases (frame encoder, prefill GEMMs)",
    "u_gpu": "GPU compute utilisation in GEMM-heavy phases (PyTorch/FlexGen on the Orin; reused for the A100)",
    "device_window_tokens": "recent KV tokens per stream kept in accelerator memory (older KV offloaded)",
    "resv_growth_exponent": "ReSV selected tokens grow as KV**exponent from the paper's ratio at COIN length",
}
STARTS = [(0.2, 0.05, w, g) for w in (0.0, 4000.0, 8000.0) for g in (0.3, 0.6, 0.9)]


def _decode(x: Sequence[float]) -> dict[str, float]:
    # unconstrained -> physical: utilisations in (0, 1), window >= 0, exponent in [0, 1.5]
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    return {"u_lxe": sig(x[0]), "u_gpu": sig(x[1]), "device_window_tokens": max(0.0, x[2] * 1000.0),
            "resv_growth_exponent": min(1.5, max(0.0, x[3]))}


def _encode(p: Sequence[float]) -> list[float]:
    logit = lambda v: math.log(v / (1.0 - v))  # noqa: E731
    return [logit(p[0]), logit(p[1]), p[2] / 1000.0, p[3]]


def calibration_specs() -> list[dict]:
    return [f for group in figures().values() for f in group if f.get("fit")]


def rel_errors(params: dict[str, float], specs: list[dict]) -> list[float]:
    ev = Evaluator(params)
    return [(ev.value(f) - f["paper"]) / f["paper"] for f in specs]


def objective(params: dict[str, float], specs: list[dict]) -> float:
    e = rel_errors(params, specs)
    return max(abs(x) for x in e) + 1e-3 * sum(x * x for x in e) / len(e)


def nelder_mead(f: Callable[[list[float]], float], x0: list[float], step: float = 0.5, iters: int = 400,
                tol: float = 1e-10) -> tuple[list[float], float]:
    """Minimal Nelder-Mead (reflection 1, expansion 2, contraction 0.5, shrink 0.5)."""
    n = len(x0)
    pts = [list(x0)] + [[x0[j] + (step if j == i else 0.0) for j in range(n)] for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = sorted(range(n + 1), key=vals.__getitem__)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) < tol:
            break
        cen = [sum(p[j] for p in pts[:-1]) / n for j in range(n)]
        refl = [cen[j] + (cen[j] - pts[-1][j]) for j in range(n)]
        fr = f(refl)
        if fr < vals[0]:
            exp = [cen[j] + 2 * (cen[j] - pts[-1][j]) for j in range(n)]
            fe = f(exp)
            pts[-1], vals[-1] = (exp, fe) if fe < fr else (refl, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = refl, fr
        else:
            con = [cen[j] + 0.5 * (pts[-1][j] - cen[j]) for j in range(n)]
            fc = f(con)
            if fc < vals[-1]:
                pts[-1], vals[-1] = con, fc
            else:
                pts = [pts[0]] + [[pts[0][j] + 0.5 * (p[j] - pts[0][j]) for j in range(n)] for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    i = min(range(n + 1), key=vals.__getitem__)
    return pts[i], vals[i]


def fit(starts: Sequence[Sequence[float]] = STARTS) -> tuple[dict[str, float], float]:
    specs = calibration_specs()
    f = lambda x: objective(_decode(x), specs)  # noqa: E731
    runs = [nelder_mead(f, _encode(s), iters=120, tol=1e-6) for s in starts]
    x0, _ = min(runs, key=lambda r: r[1])
    best, val = nelder_mead(f, x0, step=0.1, iters=400)
    return _decode(best), val


def write(params: dict[str, float], objective_value: float) -> None:
    specs = calibration_specs()
    doc = {
        "note": "Written by `python -m vrex.hw.fit`. Do not edit by hand: re-run the fit.",
        "fitted_on": [f["id"] for f in specs],
        "objective_max_rel_error": round(objective_value, 6),
        "calibration_rel_errors": {f["id"]: round(e, 4) for f, e in zip(specs, rel_errors(params, specs))},
        "date": date.today().isoformat(),
        "constants": {k: {"value": round(params[k], 6), "description": DESCRIPTIONS[k]} for k in PARAMS},
    }
    FITTED_PATH.write_text(yaml.safe_dump(doc, sort_keys=False, width=120))


def main() -> None:
    params, val = fit()
    write(params, val)
    for k in PARAMS:
        print(f"{k:24s} {params[k]:.6g}")
    print(f"objective (max relative error + tie-breaker) {val:.6f} -> {FITTED_PATH}")


if __name__ == "__main__":
    main()
