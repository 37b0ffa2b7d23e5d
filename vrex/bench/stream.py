"""`vrex bench stream`: per-frame and per-token cost as a real stream grows towards an hour (issue 15).

Method: one ``full`` session is fast-forwarded with real frames (the shared clips back to back at
2 fps) through the sizes in ascending order; at each size every policy gets a fork of that exact
state (``StreamingSession.fork``: its own tiered store and index) and runs the same measured steps:
``frames`` real frame steps (vision + one iterative prefill each), ``tokens`` decode steps, then the
fidelity text (teacher-forced real English, fed in chunks as text steps) whose next-token
distributions are compared with ``full``'s on identical inputs (top-1 agreement, KL(full||policy)).
Reported: medians, the real-time factor at 2 fps (frame ms / 500 ms), resident KV bytes per tier,
process RSS. Sizes past the LM's 8192 positions run with re-indexed positions, as streams do.

``fill_window``: the fill attends to everything (0, exact but quadratic: about 40 minutes to 64K
tokens on 2 cores) or to the prompt and the last W tokens (linear; see ``vrex.bench.fill``). The
measured steps are the same real steps over every cached token either way; each row says its fill.
``--quick`` fills with a window of ``QUICK_FILL_WINDOW`` so that it ends in about ten minutes.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path

import psutil
import torch

from vrex.bench.engine import machine
from vrex.bench.fill import open_fill
from vrex.engine.session import SessionConfig, StreamingSession
from vrex.kv.policies import make_policy
from vrex.kv.telemetry import selection_summary
from vrex.models.dtypes import DEFAULT_LM_DTYPE
from vrex.models.lm import SMOLLM2_PRESET

QUICK_SIZES = (1024, 16384, 65536)
FULL_SIZES = (1024, 4096, 16384, 32768, 65536, 86400)
QUICK_POLICIES = ("full", "rekv", "resv")
QUICK_FILL_WINDOW = 2048
TUNED = "resv[score_norm='softmax',ratio=0.95,hamming_threshold=4]"
FULL_POLICIES = ("full", "flexgen", "rekv", "resv", TUNED)

#: Real text for the fidelity positions: what a user of a live assistant asks and is told.
FIDELITY_TEXT = (
    "What is shown in the video right now? A bird is sitting on a branch in front of a green hedge. "
    "What happened earlier in the video? A man walked along a street, a car passed, and later a cartoon "
    "rabbit stood in a meadow under a tree while butterflies flew around him. Is there a person in the "
    "video? Yes, earlier there were several people walking on a pavement in front of a shop window. "
    "Describe the colours you saw. The sky was blue, the grass was bright green and the bird had white "
    "feathers with a yellow crest. How many people crossed the street? About five people crossed from "
    "left to right while a cyclist rode past. What is the weather like? It looks sunny and calm, with "
    "soft shadows on the ground and a few clouds above the trees. Was there any text on the screen? A "
    "timecode was shown in the corner for a few seconds near the start of the stream. What animal "
    "appeared first? A large white cockatoo appeared first, then a small grey bird sat on a feeder, "
    "and a cartoon squirrel ran across the grass towards a tree stump in the forest clearing. Where did "
    "the cyclist go? He turned right at the corner after the bakery and disappeared behind a parked van. "
    "What was the last thing you saw? A snowy mountain path with a girl in a red scarf walking towards a "
    "small wooden hut, while snowflakes fell slowly and a dog followed her through the deep snow. Did "
    "anything change in the room? The lamp on the table was switched off and the curtains were opened."
)


def _fidelity(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict[str, float]:
    a, b = torch.cat(ref).float(), torch.cat(got).float()
    p, q = a.log_softmax(-1), b.log_softmax(-1)
    return {"top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
            "kl": float((p.exp() * (p - q)).sum(-1).mean()), "positions": int(a.shape[0])}


def measure(session: StreamingSession, frames, tokens: int, text_ids: torch.Tensor, chunk: int) -> dict:
    model = session.model
    frame_ms, vision_ms, prefill_ms, frame_ratio, logits = [], [], [], [], []
    for t, image in frames:
        stats = session.push_frame(t, image)[0].stats
        frame_ms.append(stats["total_ms"])  # vision + the LM's prefill of the frame's tokens
        vision_ms.append(stats["vision_ms"])
        prefill_ms.append(stats["prefill_ms"])  # the LM step alone: what llama.cpp's 12-token prefill compares with
        frame_ratio.append(stats.get("selected_ratio", 1.0))
        logits.append(session.last_logits[None])
    token_ms, decode_records = [], []
    ids = torch.tensor([model.token_id(model.fmt.interval)])
    for _ in range(tokens):  # decode the interval token's continuation: the same ids for every policy
        t0 = time.perf_counter()
        out = session.feed(ids, "decode")
        token_ms.append(1e3 * (time.perf_counter() - t0))
        logits.append(out[-1:])
        decode_records.append(session.last_record)
    for lo in range(0, len(text_ids), chunk):
        logits.append(session.feed(text_ids[lo:lo + chunk], "text"))
    resident = session.store.resident_bytes()
    return {"frame_ms": statistics.median(frame_ms), "vision_ms": statistics.median(vision_ms),
            "prefill_ms": statistics.median(prefill_ms),
            "token_ms": statistics.median(token_ms), "p99_frame_ms": max(frame_ms),
            # mean share of the past tokens each attention step read (layers x KV heads; 1.0 = everything)
            "frame_selected_ratio": statistics.mean(frame_ratio),
            "token_selected_ratio": selection_summary(*decode_records).get("selected_ratio", 1.0),
            "realtime_factor_2fps": statistics.median(frame_ms) / 500.0, "resident_bytes": int(sum(resident.values())),
            "resident": {k: int(v) for k, v in resident.items()}, "rss_bytes": psutil.Process().memory_info().rss,
            "_logits": logits}


def run_stream_bench(sizes: list[int], policies: list[str], *, frames: int = 5, tokens: int = 8, text_chunk: int = 24,
                     kernels: str = "fast", out: Path, peer: Path | None = None, log=print,
                     lm: str = SMOLLM2_PRESET, lm_dtype: str = DEFAULT_LM_DTYPE, fill_window: int = 0,
                     kv_dtype: str | None = None) -> list[dict]:
    for spec in policies:  # refuse a bad spec before any model work
        make_policy(spec)
    out.mkdir(parents=True, exist_ok=True)
    sizes = sorted(sizes)
    fill = open_fill(sizes, frames, lm=lm, lm_dtype=lm_dtype, kernels=kernels, window=fill_window, log=log)
    model, base = fill.model, fill.base
    text_ids = model.tokenize(FIDELITY_TEXT)
    rows = []
    for size in sizes:
        fill_s = fill.fill_to(size)
        log(f"{size:>6}: filled to {base.cached_tokens} tokens in {fill_s:.0f} s")
        steps = fill.next_frames(frames)
        ref = None
        for spec in ["full"] + [p for p in policies if p != "full"]:
            t0 = time.perf_counter()
            # kv_dtype: the measured forks' storage type (None: the session's default); the fill stays as it is
            session = base.fork(make_policy(spec), SessionConfig(theta=0.0, kernels=kernels, kv_dtype=kv_dtype))
            index_s = time.perf_counter() - t0
            row = measure(session, steps, tokens, text_ids, text_chunk)
            logits = row.pop("_logits")
            ref = ref or logits
            fid = _fidelity(ref, logits)
            row.update({"policy": spec, "target_tokens": size, "cached_tokens": base.cached_tokens, "kernels": kernels,
                        "lm_dtype": lm_dtype, "kv_dtype": str(session.store.dtype).removeprefix("torch."),
                        "fill_window": fill_window, "fill_s": fill_s,
                        "index_build_s": index_s, **fid})
            rows.append(row)
            (out / "stream.json").write_text(json.dumps(rows, indent=2))  # progress survives an interrupted sweep
            log(f"{size:>6} {spec:<14} frame {row['frame_ms']:7.1f} ms (prefill {row['prefill_ms']:6.1f})  "
                f"token {row['token_ms']:6.1f} ms  "
                f"read {row['frame_selected_ratio']:.0%} / {row['token_selected_ratio']:.0%}  "
                f"top1 {fid['top1_agreement']:.3f}  KL {fid['kl']:.4f}  ({fid['positions']} positions)")
            del session
            gc.collect()  # its store (4 GB at 86K tokens) is freed before the next fork, whatever cycles hold it
        fill.skip(frames)
    peer_rows = json.loads(peer.read_text()).get("rows", []) if peer else []
    result = {"bench": "stream", "machine": machine(), "model": model.describe(), "frames": frames, "tokens": tokens,
              "fill_window": fill_window,
              "rows": rows, "peer_rows": peer_rows}
    (out / "stream.json").write_text(json.dumps(rows, indent=2))
    (out / "stream-full.json").write_text(json.dumps(result, indent=2))
    plot(rows, peer_rows, out / "stream.png")
    return rows


def plot(rows: list[dict], peer_rows: list[dict], path: Path) -> None:
    """Frame step, decode step and top-1 agreement with ``full`` against the cached length, per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.4))
    for spec in dict.fromkeys(r["policy"] for r in rows):
        rs = [r for r in rows if r["policy"] == spec]
        x = [r["cached_tokens"] for r in rs]
        a.plot(x, [r["frame_ms"] for r in rs], marker="o", label=spec)
        b.plot(x, [r["token_ms"] for r in rs], marker="o", label=spec)
        c.plot(x, [r["top1_agreement"] for r in rs], marker="o", label=spec)
    peer = [r for r in peer_rows if r.get("weights") == "F16" and not r.get("flash_attn")]
    if peer:
        x = [r["cached_tokens"] for r in peer]
        a.plot(x, [r["prefill12_ms"] for r in peer], "k--", marker="x", label="llama.cpp F16 (12-token prefill)")
        b.plot(x, [r["decode_ms"] for r in peer], "k--", marker="x", label="llama.cpp F16")
    a.axhline(500, color="grey", lw=0.8, ls=":")
    a.set(xlabel="cached tokens", ylabel="ms per frame step", title="frame step (vision + prefill); 500 ms = 2 fps")
    b.set(xlabel="cached tokens", ylabel="ms per token", title="decode")
    c.set(xlabel="cached tokens", ylabel="top-1 agreement with full", title="fidelity (teacher-forced text)")
    for ax in (a, b, c):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    window = rows[0].get("fill_window", 0) if rows else 0
    fig.suptitle("cache filled with full attention" if not window else
                 f"cache filled attending to the prompt and the last {window} tokens (vrex.bench.fill)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
