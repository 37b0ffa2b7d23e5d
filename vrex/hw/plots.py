"""Plots for ``vrex hw simulate`` (matplotlib, Agg backend: files only, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .sim import PHASES, StepResult  # noqa: E402

PHASE_COLORS = {
    "vision": "#8c8c8c", "qkv": "#4c72b0", "attention": "#55a868", "o_ffn": "#64b5cd",
    "hash_cluster": "#c44e52", "score_threshold": "#dd8452", "transfer": "#8172b3", "lm_head": "#937860",
}


def _kv_label(n: int) -> str:
    return f"{n // 1000}K" if n % 1000 == 0 else str(n)


def fps_vs_kv(frames: dict[str, list[StepResult]], path: Path, title: str = "") -> Path:
    """Per-stream FPS (1 / per-frame latency) against KV size, one line per system."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, steps in frames.items():
        kv = [s.kv_tokens for s in steps]
        ax.plot(kv, [1.0 / s.latency_s for s in steps], marker="o", label=name, lw=2.4 if name.startswith("vrex") else 1.4)
    ax.set_xscale("log")
    ax.set_xticks([s.kv_tokens for s in next(iter(frames.values()))])
    ax.set_xticklabels([_kv_label(s.kv_tokens) for s in next(iter(frames.values()))])
    ax.set_xlabel("KV cache per stream (tokens)")
    ax.set_ylabel("frames per second per stream")
    ax.set_title(title or "Per-frame throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def breakdown(steps: list[StepResult], path: Path, title: str = "") -> Path:
    """Stacked per-phase latency (ms) and energy (J) per KV size for one system and stage."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    x = list(range(len(steps)))
    for ax, attr, scale, unit in ((a1, "phases", 1e3, "latency (ms)"), (a2, "energy_phases", 1.0, "energy (J)")):
        bottom = [0.0] * len(steps)
        for p in PHASES:
            vals = [getattr(s, attr)[p] * scale for s in steps]
            if not any(vals):
                continue
            ax.bar(x, vals, bottom=bottom, color=PHASE_COLORS[p], label=p)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(x)
        ax.set_xticklabels([_kv_label(s.kv_tokens) for s in steps])
        ax.set_xlabel("KV cache per stream (tokens)")
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
    a1.legend(fontsize=7, ncol=2)
    fig.suptitle(title or "Breakdown by phase")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


UNIT_COLORS = {"LXE": "#4c72b0", "SRAM": "#64b5cd", "HCU": "#c44e52", "WTU": "#dd8452", "KVMU": "#8172b3", "DRAM": "#55a868",
               "PCIe": "#937860", "SSD": "#8c8c8c", "host DRAM": "#8c8c8c"}


def stages(results: dict[str, dict[str, StepResult]], path: Path, title: str = "") -> Path:
    """Per stage (frame, text, decode): latency by phase (top) and energy by unit (bottom), one bar per system."""
    order = ("frame", "text", "decode")
    fig, axes = plt.subplots(2, 3, figsize=(13.0, 7.0))
    names = list(results)
    x = list(range(len(names)))
    for j, st in enumerate(order):
        ax = axes[0][j]
        bottom = [0.0] * len(names)
        for p in PHASES:
            vals = [results[n][st].phases[p] * 1e3 for n in names]
            if any(vals):
                ax.bar(x, vals, bottom=bottom, color=PHASE_COLORS[p], label=p)
                bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(f"{st}: latency (ms)")
        ax = axes[1][j]
        bottom = [0.0] * len(names)
        units = sorted({u for n in names for u in results[n][st].energy_units}, key=lambda u: (u not in UNIT_COLORS, u))
        for u in units:
            vals = [results[n][st].energy_units.get(u, 0.0) for n in names]
            if any(vals):
                ax.bar(x, vals, bottom=bottom, color=UNIT_COLORS.get(u, "#bbbbbb" if "board" in u else None), label=u)
                bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(f"{st}: energy (J)")
        for a in (axes[0][j], axes[1][j]):
            a.set_xticks(x)
            a.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
            a.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    axes[1][0].legend(fontsize=7, ncol=2)
    fig.suptitle(title or "Where time and energy go")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["fps_vs_kv", "breakdown", "stages", "PHASE_COLORS", "UNIT_COLORS"]
