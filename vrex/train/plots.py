"""Figures from ``vrex eval live --json`` rows: needle accuracy against haystack length.

Several evaluation files (one per model, e.g. the default and the ``long`` weights) go into one
figure, one line per (file label, model, policy) and needle mode, so the effect of training at
length is seen at a glance. Pure row handling (``needle_series``) is apart from drawing.
"""

from __future__ import annotations

import re
from pathlib import Path

_NEEDLE = re.compile(r"^needle_acc(?P<silent>_silent)?@(?P<minutes>[0-9.]+)min(?P<seen>_seen_needle)?$")


def needle_series(rows: list[dict]) -> dict[tuple[str, str, str, str], list[tuple[float, float]]]:
    """``{(model, policy, mode, needles): [(minutes, accuracy), ...]}`` sorted by minutes, with mode
    'live' or 'silent' and needles 'held-out' or 'seen'. Other metrics are ignored."""
    out: dict[tuple[str, str, str, str], list[tuple[float, float]]] = {}
    for r in rows:
        m = _NEEDLE.match(r["metric"])
        if not m:
            continue
        key = (r["model"], r["policy"], "silent" if m["silent"] else "live", "seen" if m["seen"] else "held-out")
        out.setdefault(key, []).append((float(m["minutes"]), float(r["value"])))
    return {k: sorted(v) for k, v in out.items()}


def plot_needles(runs: dict[str, list[dict]], path: Path, goal: float | None = 0.6) -> None:
    """One panel per needle set (held-out, seen); ``runs`` maps a label to the rows of one eval file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {label: needle_series(rows) for label, rows in runs.items()}
    if not any(series.values()):
        raise ValueError("no needle_acc rows in the given evaluation files (were they run with --no-needles?)")
    panels = ("held-out", "seen")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    color = {}
    for ax, needles in zip(axes, panels):
        for label, by_key in series.items():
            for (model, policy, mode, kind), points in by_key.items():
                if kind != needles:
                    continue
                name = label if model in ("trained", label) else f"{label} ({model})"
                if policy != "full":
                    name += f" [{policy}]"
                c = color.setdefault(name, f"C{len(color)}")
                ax.plot(*zip(*points), marker="o" if mode == "live" else "s", ls="-" if mode == "live" else "--",
                        color=c, label=f"{name}, {mode}")
        if goal is not None and needles == "held-out":
            ax.axhline(goal, color="grey", ls=":", lw=1, label=f"goal {goal:.0%}")
        ax.set(title=f"{needles} needles", xlabel="haystack length (minutes)", ylim=(-0.05, 1.05))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("needle accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    for h, lab in zip(*axes[1].get_legend_handles_labels()):
        if lab not in labels:
            handles.append(h)
            labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12 + 0.04 * (len(labels) // 3), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
