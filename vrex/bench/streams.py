"""`vrex bench streams`: many live streams on one machine, batched against one process per stream (issue 20).

For each cached length (1K, 16K tokens), stream count (1, 2, 4, 8) and policy (full, resv):

* **batched**: one process, all CPU threads, one ``BatchEngine``; every stream is a fork of one
  ``full`` session fast-forwarded with real frames to the cached length (``StreamingSession.fork``:
  its own store and index, as in ``vrex bench stream``), and all streams step together, each with
  its own next real frames.
* **separate**: one OS process per stream (spawned; ``cores // streams`` torch threads each, at
  least 1), each filling its own session from the same encoded frames, then all measuring at once
  (a barrier starts them together).

Measured per frame: the step's wall time as the frame saw it (``total_ms``: vision + prefill; in a
batch, the whole batched step). Reported: aggregate frames/s (all streams' frames over the wall
time from the first measured step's start to the last one's end), p50/p99 per-frame latency. The
gate is closed (theta 0), so every frame step is a frame's prefill alone, as in a silent stream.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

import psutil
import torch

from vrex.bench.engine import encode_all, machine
from vrex.bench.media import long_stream
from vrex.bench.runlog import percentile
from vrex.engine.batch import BatchEngine
from vrex.engine.session import SessionConfig, StreamingSession
from vrex.kv.policies import make_policy
from vrex.models.dtypes import DEFAULT_LM_DTYPE
from vrex.models.videollm import load_videollm

QUICK = {"counts": (1, 4), "sizes": (1024,), "modes": ("batched", "separate"), "policies": ("full",)}
FULL = {"counts": (1, 2, 4, 8), "sizes": (1024, 16384), "modes": ("batched", "separate"), "policies": ("full", "resv")}
MODES = ("batched", "separate")


def _config(kernels: str) -> SessionConfig:
    return SessionConfig(theta=0.0, kernels=kernels)  # gate closed: frame steps only


def _row(streams: int, mode: str, policy: str, target: int, cached: int, frame_ms: list[float], wall_s: float,
         frames: int, threads: int) -> dict:
    return {"streams": streams, "mode": mode, "policy": policy, "target_tokens": target, "cached_tokens": cached,
            "aggregate_fps": streams * frames / wall_s, "per_stream_fps": frames / wall_s,
            "p50_frame_ms": statistics.median(frame_ms), "p99_frame_ms": percentile(frame_ms, 0.99),
            "frames_per_stream": frames, "wall_s": wall_s, "threads": threads}


def _dtype_name(model) -> str:
    return str(model.lm.dtype).removeprefix("torch.")


def _fill(model, policy: str, kernels: str, fill_times: list[float], fill_features: torch.Tensor) -> StreamingSession:
    session = StreamingSession(model, make_policy(policy), _config(kernels))
    session.fast_forward(fill_times, fill_features)
    return session


WARMUP = 2  # untimed steps first (new shapes, first allocations)


def run_batched(model, base: StreamingSession, streams: int, policy: str, measured: list[list], *, kernels: str,
                warmup: int = WARMUP) -> tuple[list[float], float, int]:
    """``streams`` forks of ``base`` stepped together; returns (per-frame ms, wall s, cached tokens)."""
    engine = BatchEngine(model, max_streams=streams)
    for i in range(streams):
        engine.attach(f"s{i}", base.fork(make_policy(policy), _config(kernels)))
    frame_ms: list[float] = []
    n = len(measured[0])
    t_start = None
    for k in range(n):
        if k == warmup:
            t_start = time.perf_counter()
        out = engine.step({f"s{i}": measured[i][k] for i in range(streams)})
        if k >= warmup:
            frame_ms += [evs[0].stats["total_ms"] for evs in out.values()]
    wall = time.perf_counter() - t_start
    cached = engine.streams["s0"].cached_tokens
    for sid in list(engine.streams):
        engine.remove_stream(sid)
    return frame_ms, wall, cached


def _separate_child(index: int, threads: int, policy: str, kernels: str, lm_dtype: str, fill_times, fill_features, frames,
                    barrier, results) -> None:
    torch.set_num_threads(threads)
    try:
        model = load_videollm(lm_dtype=lm_dtype)
        session = _fill(model, policy, kernels, fill_times, fill_features)
        for t, im in frames[:WARMUP]:  # warm-up, not measured
            session.push_frame(t, im)
        barrier.wait(timeout=1800)
        t0 = time.time()
        frame_ms = [session.push_frame(t, im)[0].stats["total_ms"] for t, im in frames[WARMUP:]]
        results.put((index, {"frame_ms": frame_ms, "start": t0, "end": time.time(), "cached": session.cached_tokens,
                             "lm_dtype": _dtype_name(model)}))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        barrier.abort()
        results.put((index, {"error": f"{type(e).__name__}: {e}"}))


def run_separate(streams: int, policy: str, fill_times, fill_features, measured: list[list], *, kernels: str,
                 cores: int, lm_dtype: str = DEFAULT_LM_DTYPE) -> tuple[list[float], float, int, int]:
    """One spawned process per stream; returns (per-frame ms, wall s, cached tokens, threads per process)."""
    ctx = mp.get_context("spawn")
    threads = max(1, cores // streams)
    barrier, results = ctx.Barrier(streams), ctx.Queue()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # children's OpenMP pools, set before they start
    try:
        procs = [ctx.Process(target=_separate_child, args=(i, threads, policy, kernels, lm_dtype, fill_times,
                                                            fill_features, measured[i], barrier, results)) for i in range(streams)]
        for p in procs:
            p.start()
        got = dict(results.get(timeout=3600) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    errors = [g["error"] for g in got.values() if "error" in g]
    if errors:
        raise RuntimeError(f"a separate stream process failed: {errors[0]}")
    dtypes = {g["lm_dtype"] for g in got.values()}
    if dtypes != {lm_dtype}:  # the children load the model themselves: hold them to the row's setting
        raise RuntimeError(f"separate stream processes ran the LM in {sorted(dtypes)}, the row says {lm_dtype}")
    frame_ms = [ms for g in got.values() for ms in g["frame_ms"]]
    wall = max(g["end"] for g in got.values()) - min(g["start"] for g in got.values())
    return frame_ms, wall, got[0]["cached"], threads


def run_streams_bench(*, counts=QUICK["counts"], sizes=QUICK["sizes"], modes=QUICK["modes"], policies=QUICK["policies"],
                      frames: int = 16, kernels: str = "fast", lm_dtype: str = DEFAULT_LM_DTYPE, out: Path,
                      log=print) -> list[dict]:
    """Sweep and write ``out/streams.json`` (rows), ``out/streams-full.json`` (+ machine) and ``out/streams.png``."""
    for spec in policies:
        make_policy(spec)  # refuse a bad spec before any model work
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if min(counts) < 1 or frames < 2:
        raise ValueError(f"stream counts must be >= 1 and frames >= 2, got counts {counts}, frames {frames}")
    out.mkdir(parents=True, exist_ok=True)
    cores = psutil.cpu_count(logical=True) or 1
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", cores)))
    model = load_videollm(lm_dtype=lm_dtype)
    tpf = model.tokens_per_frame + 1
    n_fill = max(sizes) // tpf + 1
    need = n_fill + max(counts) * (frames + WARMUP)
    stream = long_stream(need)
    features = encode_all(model, stream)
    rows: list[dict] = []
    for size in sorted(sizes):
        k = max(0, size // tpf - 3)  # the prompt and the interval tokens take the rest
        fill_times, fill_features = [t for t, _ in stream[:k]], features[:k]
        base = _fill(model, "full", kernels, fill_times, fill_features)
        log(f"{size:>6}: base filled to {base.cached_tokens} tokens")
        # each stream its own next real frames, warm-up steps first
        n = frames + WARMUP
        measured = [stream[k + i * n: k + (i + 1) * n] for i in range(max(counts))]
        for policy in policies:
            for streams in sorted(counts):
                for mode in modes:
                    if mode == "batched":
                        frame_ms, wall, cached = run_batched(model, base, streams, policy, measured, kernels=kernels)
                        threads = torch.get_num_threads()
                    else:
                        frame_ms, wall, cached, threads = run_separate(streams, policy, fill_times, fill_features,
                                                                       measured, kernels=kernels, cores=cores,
                                                                       lm_dtype=lm_dtype)
                    row = _row(streams, mode, policy, size, base.cached_tokens, frame_ms, wall, frames, threads)
                    row["lm_dtype"] = _dtype_name(model)
                    row["cached_tokens_end"] = cached
                    rows.append(row)
                    (out / "streams.json").write_text(json.dumps(rows, indent=2))  # progress survives an interrupt
                    log(f"{size:>6} {policy:<6} {streams} x {mode:<8} {row['aggregate_fps']:6.2f} frames/s  "
                        f"p50 {row['p50_frame_ms']:7.1f} ms  p99 {row['p99_frame_ms']:7.1f} ms  ({threads} threads)")
        del base
    result = {"bench": "streams", "machine": machine(), "model": model.describe(), "frames": frames, "rows": rows,
              "ratios": ratios(rows)}
    (out / "streams-full.json").write_text(json.dumps(result, indent=2))
    plot(rows, out / "streams.png")
    return rows


def ratios(rows: list[dict]) -> dict[str, float]:
    """The issue's targets where the rows allow: batched/separate at each (size, policy, count), resv/full batched."""
    key = {(r["target_tokens"], r["policy"], r["streams"], r["mode"]): r["aggregate_fps"] for r in rows}
    out = {}
    for (size, policy, n, mode), fps in key.items():
        if mode == "batched" and (size, policy, n, "separate") in key:
            out[f"batched/separate {policy} {n} streams {size}"] = fps / key[(size, policy, n, "separate")]
        if mode == "batched" and policy == "resv" and (size, "full", n, "batched") in key:
            out[f"resv/full batched {n} streams {size}"] = fps / key[(size, "full", n, "batched")]
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for size, policy, mode in sorted({(r["target_tokens"], r["policy"], r["mode"]) for r in rows}):
        rs = sorted((r for r in rows if (r["target_tokens"], r["policy"], r["mode"]) == (size, policy, mode)),
                    key=lambda r: r["streams"])
        label = f"{mode} {policy} {size // 1024}K"
        style = "-" if mode == "batched" else "--"
        a.plot([r["streams"] for r in rs], [r["aggregate_fps"] for r in rs], style, marker="o", label=label)
        b.plot([r["streams"] for r in rs], [r["p99_frame_ms"] for r in rs], style, marker="o", label=label)
    counts = sorted({r["streams"] for r in rows})
    a.set(xlabel="streams", ylabel="aggregate frames/s", title="throughput (all streams)", xticks=counts)
    b.set(xlabel="streams", ylabel="p99 ms per frame", title="per-frame latency", xticks=counts)
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
