"""``vrex bench serve``: N webcam-like clients at once against a real server on this machine.

Each client posts real JPEG frames of a shared clip over HTTP at the wall-clock rate ``fps`` (as a
webcam page does) and asks one question halfway. Measured per configuration: frames processed
and dropped per second, frame latency from arrival to processed (p50/p99: queueing included),
the model's own frame time, and answer latency (question sent -> answer with timeline received).
"""

from __future__ import annotations

import io
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import torch

from vrex.io import assets_dir, open_source
from vrex.serve.hub import ServeConfig
from vrex.serve.limits import ServeLimits
from vrex.serve.server import start_in_thread

CLIPS = ["videos/cockatoo.mp4", "videos/bbb_sky_trees.mp4", "videos/chaplin.mp4", "videos/room_tv.mp4"]
QUESTION = "What do you see?"


def clip_frames(name: str, fps: float, seconds: float) -> list[bytes]:
    root = assets_dir()
    if root is None:
        raise FileNotFoundError("shared media not found (set VREX_ASSETS to the assets folder)")
    out = []
    # Loop the clip if it is shorter than the run; 320 px like a small webcam capture.
    while len(out) < fps * seconds:
        with open_source(Path(root) / name, fps=fps, size=320) as src:
            for frame in src:
                buf = io.BytesIO()
                frame.image.save(buf, "JPEG", quality=80)
                out.append(buf.getvalue())
    return out[: int(fps * seconds) + 1]


def _client(url: str, sid: str, frames: list[bytes], fps: float, seconds: float, result: dict[str, Any]) -> None:
    """Post frames at the wall-clock rate; ask one question halfway (on its own thread, as a user would)."""
    def ask() -> None:
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/api/sessions/{sid}/ask", json={"text": QUESTION, "wait": True}, timeout=300).json()
        result["answer_ms"] = 1e3 * (time.perf_counter() - t0)
        result["answer"] = r.get("text")

    asker = threading.Timer(seconds / 2, ask)
    asker.start()
    start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=60) as c:
        for i, data in enumerate(frames):
            due = start + i / fps
            if due - start >= seconds:
                break
            time.sleep(max(0.0, due - time.perf_counter()))
            c.post(f"/api/sessions/{sid}/frames", content=data)
    asker.join()


def run_config(server, n: int, frames: list[list[bytes]], fps: float, seconds: float, policy: str) -> dict[str, Any]:
    url = server.url
    sids = [httpx.post(f"{url}/api/sessions", json={"policy": policy, "fps": fps}).json()["id"] for _ in range(n)]
    results: list[dict[str, Any]] = [{} for _ in range(n)]
    threads = [threading.Thread(target=_client, args=(url, sid, frames[i % len(frames)], fps, seconds, results[i])) for i, sid in enumerate(sids)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    time.sleep(0.5)  # let the last queued frame finish
    latencies, model_ms, per_session = [], [], []
    for sid in sids:
        live = server.hub.get(sid)
        c = live.counters
        latencies += list(c.latencies_ms)
        model_ms += [e["stats"]["total_ms"] for e in live.events_after(0) if e["type"] == "frame"]
        per_session.append({"received": c.received, "processed": c.processed, "dropped": c.dropped_behind + c.dropped_rate,
                            "narrations": c.narrations, "cached_tokens": live.session.cached_tokens})
        httpx.delete(f"{url}/api/sessions/{sid}")
    lat = sorted(latencies)
    pct = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else None  # noqa: E731
    answers = [r["answer_ms"] for r in results if "answer_ms" in r]
    processed = sum(s["processed"] for s in per_session)
    dropped = sum(s["dropped"] for s in per_session)
    return {
        "sessions": n, "fps": fps, "seconds": round(wall, 2), "sent": sum(s["received"] for s in per_session),
        "processed_per_s": round(processed / wall, 2), "dropped_per_s": round(dropped / wall, 2),
        "processed_per_s_per_session": round(processed / wall / n, 2), "drop_fraction": round(dropped / max(1, processed + dropped), 3),
        "latency_p50_ms": pct(0.5), "latency_p99_ms": pct(0.99),
        "model_frame_ms_p50": round(statistics.median(model_ms), 1) if model_ms else None,
        "answer_ms_p50": round(statistics.median(answers), 1) if answers else None, "answer_ms_max": round(max(answers), 1) if answers else None,
        "narrations": sum(s["narrations"] for s in per_session), "per_session": per_session,
        "answers": [r.get("answer") for r in results],
    }


def run_bench(counts: list[int], fps: float = 2.0, seconds: float = 20.0, policy: str = "full", threads: int = 2,
              out: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    from vrex.models.videollm import load_videollm

    torch.set_num_threads(threads)
    model = load_videollm()
    frames = [clip_frames(name, fps, seconds) for name in CLIPS[: max(counts)]]
    server = start_in_thread(model, ServeConfig(port=0, threads=threads, limits=ServeLimits(max_sessions=max(counts), max_fps=max(4.0, fps))))
    try:
        run_config(server, 1, frames, fps, 3.0, policy)  # warm-up (first steps are slower)
        rows = []
        for n in counts:
            log(f"{n} session(s) x {seconds:.0f} s at {fps} fps...")
            rows.append(run_config(server, n, frames, fps, seconds, policy))
    finally:
        server.stop()
    result = {"command": f"vrex bench serve --sessions {','.join(map(str, counts))} --fps {fps} --seconds {seconds} --policy {policy} --threads {threads}",
              "machine": {"cpu": cpu_name(), "threads": threads, "cores": os.cpu_count(), "torch": torch.__version__},
              "clips": CLIPS[: max(counts)], "rows": rows}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        plot(result, out.with_suffix(".png"))
    return result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(result: dict[str, Any]) -> str:
    head = "| sessions | sent/s | processed/s | dropped/s | p50 latency ms | p99 latency ms | model frame ms | answer ms (p50) | narrations |"
    lines = [head, "|" + "---:|" * 9]
    for r in result["rows"]:
        lines.append(f"| {r['sessions']} | {r['sent'] / r['seconds']:.1f} | {r['processed_per_s']:.2f} | {r['dropped_per_s']:.2f} | "
                     f"{r['latency_p50_ms']} | {r['latency_p99_ms']} | {r['model_frame_ms_p50']} | {r['answer_ms_p50']} | {r['narrations']} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    n = [str(r["sessions"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.bar(n, [r["processed_per_s"] for r in rows], label="processed")
    a.bar(n, [r["dropped_per_s"] for r in rows], bottom=[r["processed_per_s"] for r in rows], label="dropped")
    a.set(xlabel="concurrent sessions", ylabel="frames / s (all sessions)", title="throughput")
    a.legend()
    x = range(len(rows))
    b.plot(x, [r["latency_p50_ms"] for r in rows], "o-", label="frame p50")
    b.plot(x, [r["latency_p99_ms"] for r in rows], "o-", label="frame p99")
    b.plot(x, [r["answer_ms_p50"] for r in rows], "s--", label="answer p50")
    b.set(xticks=list(x), xticklabels=n, xlabel="concurrent sessions", ylabel="ms", title="latency", yscale="log")
    b.legend()
    fig.suptitle(f"vrex serve, {rows[0]['fps']} fps per session, {result['machine'].get('threads', '?')} torch threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
