"""`vrex bench engine`: latency of the `full` policy as the cache grows (issue #2's baseline).

At each cached-token size the stream is fast-forwarded with real frames (chunked prefill), then
``frames`` real frame steps (vision + one iterative prefill each) and ``tokens`` decode steps are
timed. Reports medians; peak RSS comes from the OS.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Callable

import psutil
import torch
from tqdm import tqdm

from vrex.bench.media import long_stream
from vrex.engine.session import SessionConfig, StreamingSession
from vrex.kv.policies import make_policy
from vrex.models.videollm import load_videollm


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {"cpu": cpu_name(), "cores": psutil.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "python": platform.python_version()}


def encode_all(model, frames, batch: int = 16) -> torch.Tensor:
    """Encode every frame once: [N, tokens, d_vis] encoder features (``StreamingSession.fast_forward`` input).

    A looped stream (``long_stream``) repeats the same ``Image`` objects: each distinct one is encoded
    once and its features are reused, so an hour of the shared clips costs one pass of the encoder."""
    slot: dict[int, int] = {}  # id(image) -> row of ``distinct``
    distinct = []
    for _, image in frames:
        if id(image) not in slot:
            slot[id(image)] = len(distinct)
            distinct.append(image)
    out = []
    for lo in tqdm(range(0, len(distinct), batch), desc="encoding frames", unit="batch", leave=False):
        out.append(model.encode_frames(distinct[lo:lo + batch]))
    features = torch.cat(out)
    return features[torch.tensor([slot[id(image)] for _, image in frames])]


def run_engine_bench(sizes: list[int], *, frames: int = 8, tokens: int = 16, out: Path = Path("bench-out/engine"),
                     policy: str = "full", log: Callable[[str], None] = print) -> list[dict]:
    """Rows (one per size) written to ``out/engine.json`` with a plot; ``log`` gets a line per size."""
    out.mkdir(parents=True, exist_ok=True)
    model = load_videollm()
    sizes = sorted(sizes)
    tpf = model.tokens_per_frame + 1  # frame tokens + interval token
    n_total = sizes[-1] // tpf + (frames + 2) * len(sizes) + 8
    stream = long_stream(n_total)
    features = encode_all(model, stream)
    session = StreamingSession(model, make_policy(policy), SessionConfig(theta=0.0))
    rows, cursor = [], 0
    for size in sizes:
        need = max(0, (size - session.cached_tokens) // tpf)
        if need:
            session.fast_forward([t for t, _ in stream[cursor:cursor + need]], features[cursor:cursor + need])
            cursor += need
        vision, prefill, total = [], [], []
        for t, image in stream[cursor:cursor + frames]:
            stats = session.push_frame(t, image)[0].stats
            vision.append(stats["vision_ms"]), prefill.append(stats["prefill_ms"]), total.append(stats["total_ms"])
        cursor += frames
        token_ms = []
        ids = torch.tensor([model.token_id(model.fmt.interval)])
        for _ in range(tokens):
            t0 = time.perf_counter()
            logits = session.feed(ids, "decode")
            token_ms.append(1e3 * (time.perf_counter() - t0))
            ids = logits[-1].argmax().view(1)
        mem = session.memory()
        rows.append({"policy": policy, "target_tokens": size, "cached_tokens": session.cached_tokens,
                     "vision_ms": statistics.median(vision), "prefill_ms": statistics.median(prefill),
                     "frame_ms": statistics.median(total), "token_ms": statistics.median(token_ms),
                     "kv_bytes": mem["kv_bytes"], "rss_bytes": mem["rss_bytes"],
                     "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
        log(f"{size:>6} tokens: frame {rows[-1]['frame_ms']:.1f} ms, token {rows[-1]['token_ms']:.1f} ms")
    result = {"bench": "engine", "machine": machine(), "model": model.describe(), "frames_timed": frames,
              "tokens_timed": tokens, "rows": rows}
    (out / "engine.json").write_text(json.dumps(result, indent=2))
    _plot(rows, out / "engine.png")
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["cached_tokens"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("frame_ms", "frame total"), ("prefill_ms", "prefill"), ("vision_ms", "vision")):
        a.plot(x, [r[key] for r in rows], marker="o", label=label)
    a.set(xlabel="cached tokens", ylabel="ms per frame", title="per-frame latency")
    a.legend()
    b.plot(x, [r["token_ms"] for r in rows], marker="o", color="C3")
    b.set(xlabel="cached tokens", ylabel="ms per token", title="decode latency")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
