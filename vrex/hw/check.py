"""``vrex hw check``: reproduce the paper's figures (``configs/paper_figures.yaml``) with the simulator.

Each row: ``figure``, ``paper`` (``None`` where the notes withhold it), ``simulated``, ``rel_error``
(``(simulated - paper) / paper``) and ``fitted`` (a fitted constant was fitted on this figure).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import CONFIG_DIR, Constants, load_constants, load_fitted, load_system, read_yaml
from .model_shapes import ModelShape, preset
from .sim import StepResult, Workload, simulate_step

GOAL = 0.25  # issue #4: every figure within 25%


@dataclass(frozen=True)
class Row:
    id: str
    group: str  # calibration | checked | predictions
    figure: str
    paper: float | None
    simulated: float
    rel_error: float | None
    fitted: bool

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "group": self.group, "figure": self.figure, "paper": self.paper,
                "simulated": self.simulated, "rel_error": self.rel_error, "fitted": self.fitted}


def figures() -> dict[str, list[dict]]:
    return read_yaml(CONFIG_DIR / "paper_figures.yaml")


class Evaluator:
    """Evaluates figure specs, caching simulated steps."""

    def __init__(self, fitted: dict[str, float] | None = None, model: ModelShape | None = None,
                 consts: Constants | None = None) -> None:
        self.fitted = load_fitted() if fitted is None else fitted
        self.c = consts or load_constants(self.fitted)
        self.model = model or preset("llama3-8b")
        self._cache: dict[tuple, StepResult] = {}

    def step(self, system: str, kv: int, batch: int, stage: str) -> StepResult:
        key = (system, kv, batch, stage)
        if key not in self._cache:
            sys_ = load_system(system, self.fitted)
            self._cache[key] = simulate_step(sys_, self.model, Workload(kv, batch), stage, c=self.c)  # type: ignore[arg-type]
        return self._cache[key]

    def value(self, f: dict) -> float:
        kind, kv, b = f["kind"], int(f["kv"]), int(f.get("batch", 1))
        stage = f.get("stage", "decode" if kind.startswith("tpot") else "frame")
        s = self.step(f["system"], kv, b, stage)
        if kind in ("frame_ms", "tpot_ms"):
            return s.latency_s * 1e3
        if kind == "frame_fps":
            return 1.0 / s.latency_s
        if kind in ("frame_speedup", "tpot_speedup"):
            return self.step(f["baseline"], kv, b, stage).latency_s / s.latency_s
        if kind == "energy_eff":
            return self.step(f["baseline"], kv, b, stage).energy_j / s.energy_j
        if kind == "roofline":
            return s.roofline_fraction
        if kind == "phase_share":
            return sum(s.phases[p] for p in f["phases"]) / s.latency_s
        raise ValueError(f"unknown figure kind {kind!r}")


def run_check(fitted: dict[str, float] | None = None, model: ModelShape | None = None) -> list[Row]:
    ev = Evaluator(fitted, model)
    rows = []
    for group, specs in figures().items():
        for f in specs:
            sim = ev.value(f)
            paper = f.get("paper")
            err = None if paper is None else (sim - paper) / paper
            rows.append(Row(f["id"], group, f["figure"], paper, sim, err, bool(f.get("fit", False))))
    return rows


def within_goal(rows: list[Row], groups: tuple[str, ...] = ("calibration",)) -> list[Row]:
    """Rows of ``groups`` that miss the 25% goal."""
    return [r for r in rows if r.group in groups and r.rel_error is not None and abs(r.rel_error) > GOAL]


__all__ = ["GOAL", "Row", "Evaluator", "figures", "run_check", "within_goal"]
