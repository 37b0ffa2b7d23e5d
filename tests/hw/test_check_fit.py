"""The check table and the honesty of the fit (what it may read, what it stored)."""

from __future__ import annotations

import copy

import pytest

from vrex.hw import fit as fitmod
from vrex.hw.check import GOAL, figures, run_check, within_goal
from vrex.hw.config import FITTED_PATH, load_fitted, read_yaml

ROWS = run_check()


#: calibration figures a smooth model cannot reach within 25% (docs/hw.md, "Reading the table"): the
#: paper's V-Rex8 curve steps from 123 ms at 5K to 198 ms at 10K and is flat again to 20K.
KNOWN_MISSES = {"vrex8_frame_10k": 0.40}


def test_calibration_figures_are_within_the_goal():
    """Guards the calibration: every fitted figure within 25%, except the documented miss (bounded)."""
    bad = within_goal(ROWS)
    assert {r.id for r in bad} <= set(KNOWN_MISSES), [(r.figure, r.paper, round(r.simulated, 3)) for r in bad]
    assert all(abs(r.rel_error) <= KNOWN_MISSES[r.id] for r in bad)
    assert sum(r.group == "calibration" for r in ROWS) == 7


def test_rows_have_the_documented_fields():
    for r in ROWS:
        d = r.to_dict()
        assert {"figure", "paper", "simulated", "rel_error", "fitted"} <= set(d)
        if r.paper is None:
            assert r.rel_error is None and r.group == "predictions" and not r.fitted
        else:
            assert r.rel_error == pytest.approx((r.simulated - r.paper) / r.paper)
        assert r.simulated == r.simulated and r.simulated > 0  # finite, positive
    assert {r.group for r in ROWS} == {"calibration", "checked", "predictions"}
    covered = " ".join(r.figure for r in ROWS if r.group == "predictions")
    for topic in ("b4", "b8", "V-Rex48", "A100", "Energy efficiency", "Roofline", "Oaken", "Ablation energy",
                  "AGX+ReKV", "TPOT"):
        assert topic in covered


def test_only_the_allowed_figures_are_fitted():
    """Issue #4: fit only on V-Rex8 batch-1 per-frame latencies and per-frame speedups over AGX+FlexGen."""
    specs = fitmod.calibration_specs()
    assert specs and all(f["system"] == "vrex8" and f.get("batch", 1) == 1 and f["kind"] in ("frame_ms", "frame_speedup")
                         for f in specs)
    assert all(f.get("baseline", "agx+flexgen") == "agx+flexgen" for f in specs)
    assert {r.id for r in ROWS if r.fitted} == {f["id"] for f in specs}
    for group, rows in figures().items():
        if group != "calibration":
            assert not any(f.get("fit") for f in rows)


def test_objective_ignores_everything_but_the_calibration(monkeypatch):
    params = load_fitted()
    base = fitmod.objective(params, fitmod.calibration_specs())
    figs = copy.deepcopy(figures())
    for group in ("checked", "predictions"):
        for f in figs[group]:
            f["paper"] = 1e6  # absurd targets elsewhere must not move the fit
    monkeypatch.setattr(fitmod, "figures", lambda: figs)
    assert fitmod.objective(params, fitmod.calibration_specs()) == pytest.approx(base)


def test_fitted_file_is_current():
    """fitted.yaml's recorded errors match what the model computes now (re-run the fit if not)."""
    doc = read_yaml(FITTED_PATH)
    assert set(doc["constants"]) == set(fitmod.PARAMS)
    assert doc["fitted_on"] == [f["id"] for f in fitmod.calibration_specs()]
    now = {r.id: r.rel_error for r in ROWS if r.fitted}
    for k, v in doc["calibration_rel_errors"].items():
        assert now[k] == pytest.approx(v, abs=2e-4), k
    assert all(abs(v) <= GOAL or k in KNOWN_MISSES for k, v in now.items())
    for k, v in doc["constants"].items():  # the fitter kept every constant inside its plausible range
        lo, hi = fitmod.RANGES[k]
        assert lo - 1e-9 <= v["value"] <= hi + 1e-9 and v["range"] == [lo, hi]


def test_fit_cannot_leave_the_plausible_ranges():
    for x in ([-50.0, 50.0], [50.0, -50.0], [0.0, 0.0]):
        p = fitmod._decode(x)
        assert all(fitmod.RANGES[k][0] <= v <= fitmod.RANGES[k][1] for k, v in p.items())
    assert fitmod._decode(fitmod._encode([0.5, 0.4])) == pytest.approx({"vision_eff": 0.5, "cpu_attn_eff": 0.4})


def test_nelder_mead_finds_a_quadratic_minimum():
    x, v = fitmod.nelder_mead(lambda p: (p[0] - 1.5) ** 2 + 2 * (p[1] + 0.5) ** 2, [0.0, 0.0])
    assert x == pytest.approx([1.5, -0.5], abs=1e-3) and v < 1e-6


def test_wtu_constants_in_the_config_equal_the_unit():
    """configs/constants.yaml documents the WTU's bucket count and final-group latency; the unit's own
    values time the WTU, so the two must not drift apart."""
    from vrex.hw.config import load_constants
    from vrex.hw.wtu import FINAL_LATENCY, WTUConfig

    c = load_constants()
    assert c["wtu_buckets"] == WTUConfig().num_buckets and c["wtu_refine_cycles"] == FINAL_LATENCY
