"""``vrex report``: what a ``vrex run --json`` log says, minute by minute (issue 15, item 6).

A long run's log is thousands of JSON lines: one ``frame`` event per frame (``stats.total_ms`` is
vision + prefill, with the resident memory and each KV tier's bytes after the step), ``response``
events (narration), ``answer`` events and a closing ``source_end``. This module turns one or more
logs into what a reader asks of a long stream:

* does it keep up: per-frame p50 / p99 / max latency, frames over a deadline (500 ms: a frame at
  2 fps must be done before the next one), the frames that re-indexed positions (``stats.reindex_ms``:
  every few thousand tokens past the LM's window, the largest frames of a long run), and the **busy share** of each stream minute: frames,
  narrations and answers together, in seconds of compute per second of stream the minute's frames
  cover (frames / fps, from the ``start`` event; 60 s if it has none). Below 1: real time;
* is memory bounded: RSS and each tier's MiB at the last frame of each minute;
* what did it say: the answers with their times, the narration count.

Pure functions over the events (``read_events``, ``summarize``); ``table`` and ``plot`` render one
or several summaries side by side (e.g. ``resv`` against ``full`` on the same source).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

MIB = 2**20


class RunLogError(ValueError):
    """A log that is not a ``vrex run --json`` log; the message names the file and the line."""


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 1]) of a non-empty list: a value that occurred."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def read_events(path: Path) -> list[dict]:
    """The JSON events of a ``vrex run --json`` log, in order. A line that is not a JSON object, or
    a log without one ``frame`` event, raises :class:`RunLogError` naming the file and the line."""
    events = []
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RunLogError(f"{path}: cannot read it as a text log ({e})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunLogError(f"{path}, line {n}: not JSON ({e.msg}); give the output of `vrex run --json`") from None
        if not isinstance(event, dict) or "kind" not in event:
            raise RunLogError(f"{path}, line {n}: not a vrex event (a JSON object with a 'kind')")
        events.append(event)
    if not any(e["kind"] == "frame" for e in events):
        raise RunLogError(f"{path}: no frame events; give the output of `vrex run --json` over at least one frame")
    return events


def _response_s(stats: dict) -> float:
    """Compute time of a narration or an answer: its prompt prefill and every generated token."""
    return (stats.get("prompt_ms", 0.0) + sum(stats.get("token_ms", []))) / 1000


def summarize(events: list[dict], *, deadline_ms: float = 500.0, minute_s: float = 60.0, name: str | None = None) -> dict:
    """Totals and per-minute rows of one run (see the module docstring). ``name`` defaults to the
    run's policy from its ``start`` event."""
    start = next((e for e in events if e["kind"] == "start"), {})
    frames = [e for e in events if e["kind"] == "frame"]
    spoken = [e for e in events if e["kind"] in ("response", "answer")]
    end = next((e for e in events if e["kind"] == "source_end"), None)
    frame_ms = [e["stats"]["total_ms"] for e in frames]
    reindex = [e["stats"]["reindex_ms"] for e in frames if e["stats"].get("reindex_ms")]

    fps = start.get("fps")  # a minute's busy share is over the stream time its frames cover (the last may be partial)
    minutes: dict[int, dict] = {}
    for e in frames:
        m = int(e["t"] // minute_s) + 1
        row = minutes.setdefault(m, {"minute": m, "frame_ms": [], "reindex_ms": [], "busy_s": 0.0})
        row["frame_ms"].append(e["stats"]["total_ms"])
        if e["stats"].get("reindex_ms"):  # logs before the field have none
            row["reindex_ms"].append(e["stats"]["reindex_ms"])
        row["busy_s"] += e["stats"]["total_ms"] / 1000
        row["last"] = e["stats"]
    for e in spoken:
        m = int(e["t"] // minute_s) + 1
        if m in minutes:
            minutes[m]["busy_s"] += _response_s(e["stats"])
    per_minute = []
    for m in sorted(minutes):
        row, last = minutes[m], minutes[m]["last"]
        per_minute.append({
            "minute": m, "frames": len(row["frame_ms"]), "cached_tokens": last.get("cached_tokens"),
            "p50_frame_ms": round(statistics.median(row["frame_ms"]), 1),
            "p99_frame_ms": round(percentile(row["frame_ms"], 0.99), 1), "max_frame_ms": round(max(row["frame_ms"]), 1),
            "frames_over_deadline": sum(ms > deadline_ms for ms in row["frame_ms"]),
            "reindex_frames": len(row["reindex_ms"]), "max_reindex_ms": round(max(row["reindex_ms"]), 1) if row["reindex_ms"] else None,
            "busy_share": round(row["busy_s"] / (len(row["frame_ms"]) / fps if fps else minute_s), 3),
            **{f"{k}_mib": round(last[f"{k}_bytes"] / MIB) for k in ("rss", "device", "host", "disk") if f"{k}_bytes" in last},
        })
    rss = [r["rss_mib"] for r in per_minute if "rss_mib" in r]
    return {
        "name": name or start.get("policy") or "run", "policy": start.get("policy"), "source": start.get("source"),
        "model": start.get("model"), "frames": len(frames), "deadline_ms": deadline_ms,
        "stream_s": frames[-1]["t"] - frames[0]["t"] if frames else 0.0,
        "p50_frame_ms": round(statistics.median(frame_ms), 1), "p99_frame_ms": round(percentile(frame_ms, 0.99), 1),
        "max_frame_ms": round(max(frame_ms), 1), "frames_over_deadline": sum(ms > deadline_ms for ms in frame_ms),
        "max_busy_share": max(r["busy_share"] for r in per_minute),
        "reindex_frames": len(reindex), "p50_reindex_ms": round(statistics.median(reindex), 1) if reindex else None,
        "max_reindex_ms": round(max(reindex), 1) if reindex else None,
        "rss_first_mib": rss[0] if rss else None, "rss_last_mib": rss[-1] if rss else None,
        "rss_max_mib": max(rss) if rss else None,
        "narrations": sum(e["kind"] == "response" for e in events),
        "answers": [{"t": e["t"], "question": e["stats"].get("question"), "text": e["text"]}
                    for e in events if e["kind"] == "answer"],
        "end": None if end is None else {k: end.get(k) for k in ("status", "reason", "frames", "warnings")},
        "per_minute": per_minute,
    }


def table(summaries: list[dict], *, every: int = 1) -> str:
    """Markdown: one line per run, then per-minute rows (every ``every``-th minute, and the last)."""
    lines = ["| run | frames | frame p50 ms | p99 ms | max ms | over deadline | re-indexing frames, p50 / max ms | max busy share | RSS first / last / max MiB | answers |",
             "|---|---:|---:|---:|---:|---:|---|---:|---|---:|"]
    for s in summaries:
        reindex = f"{s['reindex_frames']}, {s['p50_reindex_ms']} / {s['max_reindex_ms']}" if s.get("reindex_frames") else "0"
        lines.append(f"| {s['name']} | {s['frames']} | {s['p50_frame_ms']} | {s['p99_frame_ms']} | {s['max_frame_ms']} | "
                     f"{s['frames_over_deadline']} | {reindex} | {s['max_busy_share']} | {s['rss_first_mib']} / {s['rss_last_mib']} / "
                     f"{s['rss_max_mib']} | {len(s['answers'])} |")
    lines += ["", "| run | minute | cached tokens | frame p50 ms | p99 ms | max ms | busy share | RSS MiB | device / host / disk MiB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in summaries:
        rows = s["per_minute"]
        for i, r in enumerate(rows):
            if i % max(1, every) and i != len(rows) - 1:
                continue
            tiers = " / ".join(str(r.get(f"{k}_mib", "-")) for k in ("device", "host", "disk"))
            lines.append(f"| {s['name']} | {r['minute']} | {r['cached_tokens']} | {r['p50_frame_ms']} | {r['p99_frame_ms']} | "
                         f"{r['max_frame_ms']} | {r['busy_share']} | {r.get('rss_mib', '-')} | {tiers} |")
    return "\n".join(lines)


def plot(summaries: list[dict], path: Path) -> None:
    """Two panels over stream minutes: frame latency (p50 solid, p99 dashed, deadline line) and RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, mem) = plt.subplots(1, 2, figsize=(11, 4))
    for i, s in enumerate(summaries):
        colour = f"C{i}"
        x = [r["minute"] for r in s["per_minute"]]
        lat.plot(x, [r["p50_frame_ms"] for r in s["per_minute"]], color=colour, label=f"{s['name']} p50")
        lat.plot(x, [r["p99_frame_ms"] for r in s["per_minute"]], color=colour, ls="--", lw=0.9, label=f"{s['name']} p99")
        mem.plot(x, [r.get("rss_mib", math.nan) for r in s["per_minute"]], color=colour, marker="o", ms=2, label=f"{s['name']} RSS")
    deadline = summaries[0]["deadline_ms"] if summaries else 500.0
    lat.axhline(deadline, color="k", ls=":", lw=0.8, label=f"deadline {deadline:g} ms")
    lat.set(xlabel="stream minute", ylabel="frame step ms (vision + prefill)", title="per-frame latency")
    mem.set(xlabel="stream minute", ylabel="MiB", title="resident memory (end of each minute)")
    mem.set_ylim(bottom=0)
    for ax in (lat, mem):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["RunLogError", "percentile", "plot", "read_events", "summarize", "table"]
