"""`vrex bench kv`: every KV policy side by side on one real stream (issue #3).

Method, per cached-token size:
1. One ``full`` session is fast-forwarded with real frames to the size (shared by all policies).
2. Each policy gets a fork of that exact state (``StreamingSession.fork``): the same cached K/V in
   its own tiered store (offloading policies keep only ``device_tokens`` recent tokens on the device
   tier), with its index (clusters, frame means, ...) built frame by frame.
3. Every fork, ``full`` included, runs the same measured steps: ``frames`` real frame steps
   (iterative prefill with the policy's selection), then ``questions`` questions, each a prompt
   prefill and a teacher-forced decode of ``full``'s greedy answer.
4. Fidelity to ``full`` on those steps: next-token top-1 agreement and mean KL(full || policy) over
   every frame end, prompt end and decoded position; answer agreement = all top-1 predictions along
   ``full``'s greedy answer agree, which is exactly when free-running greedy decoding with the
   policy would produce the same answer.
Selection ratios come from the telemetry records (``vrex.kv.telemetry``): tokens read / past tokens,
always-kept sink and recent tokens included, averaged over layers and KV heads.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from vrex.bench.engine import machine
from vrex.bench.fill import open_fill
from vrex.engine.session import SessionConfig, StreamingSession
from vrex.kv.policies import make_policy
from vrex.kv.telemetry import step_to_json
from vrex.models.lm import SMOLLM2_PRESET

QUESTIONS = ("What is shown in the video right now?", "What happened earlier in the video?", "Is there a person in the video?")


@dataclass
class Collector:
    """In-memory telemetry sink: summaries per stage and per-layer/head ratios."""

    records: list[dict] = field(default_factory=list)

    def __call__(self, record, extra) -> None:
        self.records.append(step_to_json(record, extra))

    def mean(self, stage: str, key: str = "selected_ratio") -> float | None:
        vals = [r["summary"][key] for r in self.records if r["stage"] == stage and r.get("summary") and r["summary"].get(key) is not None]
        return statistics.fmean(vals) if vals else None

    def heat(self, stage: str) -> list[list[float]] | None:
        """Mean selected ratio per [layer][kv head] over the stage's steps."""
        rows = [r for r in self.records if r["stage"] == stage]
        if not rows:
            return None
        acc: dict[int, list[list[float]]] = {}
        for r in rows:
            for layer in r["layers"]:
                ratios = layer.get("selected_ratio")
                if isinstance(ratios, list):
                    acc.setdefault(layer["layer"], []).append(ratios)
        return [[statistics.fmean(col) for col in zip(*acc[i])] for i in sorted(acc)] if acc else None


@dataclass
class Trace:
    logits: list[torch.Tensor] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)  # full's greedy answer per question
    frame_ms: list[float] = field(default_factory=list)
    token_ms: list[float] = field(default_factory=list)
    stop: int = -1  # the stop token id (end of an answer)


def measured_steps(session: StreamingSession, frames, questions: list[str], answer_tokens: int, forced: list[list[int]] | None) -> Trace:
    model = session.model
    trace = Trace(stop=model.token_id(model.fmt.stop))
    for t, image in frames:
        stats = session.push_frame(t, image)[0].stats
        trace.frame_ms.append(stats["total_ms"])
        trace.logits.append(session.last_logits.float())
    for qi, question in enumerate(questions):
        logits = session.feed(model.tokenize(model.fmt.question.format(question=question)), "text")[-1]
        trace.logits.append(logits.float())
        answer: list[int] = []
        # Always decode `answer_tokens` tokens (greedy for full, full's tokens for the others), past
        # a stop token too, so decode latency and ratios are measured at every size.
        for step in range(answer_tokens):
            nxt = forced[qi][step] if forced is not None else int(logits.argmax())
            answer.append(nxt)
            if step == answer_tokens - 1:
                break
            t0 = time.perf_counter()
            logits = session.feed(torch.tensor([nxt]), "decode")[-1]
            trace.token_ms.append(1e3 * (time.perf_counter() - t0))
            trace.logits.append(logits.float())
        trace.tokens.append(answer)
        session.feed(model.tokenize(model.fmt.stop + model.fmt.resume), "text")
    return trace


def fidelity(ref: Trace, got: Trace) -> dict[str, float]:
    a, b = torch.stack(ref.logits), torch.stack(got.logits)
    p, q = a.log_softmax(-1), b.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    agree = a.argmax(-1) == b.argmax(-1)
    # Answer positions: the prompt-end logits and decode logits that predicted each answer token.
    n_frames = len(ref.frame_ms)
    idx, answers_ok = n_frames, []
    for answer in ref.tokens:
        # The answer is full's greedy output up to its first stop token (decoding went on past it).
        length = answer.index(ref.stop) + 1 if ref.stop in answer else len(answer)
        answers_ok.append(bool(agree[idx: idx + length].all()))
        idx += len(answer)
    return {"top1_agreement": float(agree.float().mean()), "kl": float(kl.mean()),
            "answer_agreement": statistics.fmean(answers_ok) if answers_ok else float("nan")}


def run_kv_bench(policies: list[str], sizes: list[int], *, frames: int, n_questions: int, answer_tokens: int,
                 device_tokens: int, recent_tokens: int, out: Path, log: Callable[[str], None] = print,
                 lm: str = SMOLLM2_PRESET) -> list[dict]:
    """Rows (one per size and policy spec, specs checked by the caller) written to ``out/kv.json`` with
    the plots; ``log`` gets one line per row as it is measured."""
    out.mkdir(parents=True, exist_ok=True)
    sizes = sorted(sizes)
    fill = open_fill(sizes, frames, lm=lm, log=log)
    model, base = fill.model, fill.base
    questions = list(QUESTIONS[:n_questions])
    rows, heat = [], {}
    for size in sizes:
        fill.fill_to(size)
        steps = fill.next_frames(frames)
        ref_trace = None
        for name in ["full"] + [p for p in policies if p != "full"]:
            policy = make_policy(name)  # a spec, checked by the command before the model loaded
            config = SessionConfig(theta=0.0, recent_tokens=recent_tokens, device_tokens=device_tokens)
            t0 = time.perf_counter()
            session = base.fork(policy, config)
            index_s = time.perf_counter() - t0
            collector = Collector()
            session.trace = collector
            before = session.store.counters()
            trace = measured_steps(session, steps, questions, answer_tokens, None if ref_trace is None else ref_trace.tokens)
            if ref_trace is None:
                ref_trace = trace
            after = session.store.counters()
            moved = {k: after[k] - before.get(k, 0) for k in ("fetch_host_bytes", "fetch_disk_bytes", "fetch_host_transfers", "fetch_disk_transfers")}
            resident = session.store.resident_bytes()
            row = {"policy": name, "target_tokens": size, "cached_tokens": base.cached_tokens,
                   "frame_ms": statistics.median(trace.frame_ms), "token_ms": statistics.median(trace.token_ms) if trace.token_ms else None,
                   "frame_ratio": collector.mean("frame"), "decode_ratio": collector.mean("decode"),
                   "frame_policy_ratio": collector.mean("frame", "policy_selected_ratio"),
                   "decode_policy_ratio": collector.mean("decode", "policy_selected_ratio"),
                   "clusters": collector.mean("frame", "clusters"), "mean_cluster_size": collector.mean("frame", "mean_cluster_size"),
                   "scan_fraction": collector.mean("decode", "scan_fraction"), "hc_ratio": collector.mean("frame", "hc_ratio"),
                   **fidelity(ref_trace, trace), "resident_bytes": sum(resident.values()), "resident": resident,
                   "bytes_moved": moved["fetch_host_bytes"] + moved["fetch_disk_bytes"],
                   "transfers": moved["fetch_host_transfers"] + moved["fetch_disk_transfers"], "index_build_s": index_s}
            rows.append(row)
            if name in ("resv", "rekv", "infinigen"):
                heat[f"{name}@{size}"] = {"frame": collector.heat("frame"), "decode": collector.heat("decode")}
            log(f"{size:>6} {name:<13} frame {row['frame_ms']:7.1f} ms  token {row['token_ms'] or 0:6.1f} ms  "
                f"ratio {pct(row['frame_ratio'])}/{pct(row['decode_ratio'])}  top1 {row['top1_agreement']:.3f}  KL {row['kl']:.4f}")
            del session
        fill.skip(frames)
    result = {"bench": "kv", "machine": machine(), "model": model.describe(), "frames": frames, "questions": questions,
              "answer_tokens": answer_tokens, "device_tokens": device_tokens, "recent_tokens": recent_tokens, "rows": rows, "heat": heat}
    (out / "kv.json").write_text(json.dumps(result, indent=2))
    _plots(rows, heat, out)
    return rows


def pct(x: float | None) -> str:
    return "  -  " if x is None else f"{100 * x:5.1f}%"


def _plots(rows: list[dict], heat: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == name]
        x = [r["cached_tokens"] for r in mine]
        axes[0].plot(x, [r["frame_ms"] for r in mine], marker="o", label=name)
        axes[1].plot(x, [r["token_ms"] for r in mine], marker="o", label=name)
    axes[0].set(xlabel="cached tokens", ylabel="ms", title="per-frame latency")
    axes[1].set(xlabel="cached tokens", ylabel="ms", title="per-token decode latency")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "kv_latency.png", dpi=120)
    plt.close(fig)
    maps = [(k, stage, v[stage]) for k, v in heat.items() if k.startswith("resv@") for stage in ("frame", "decode") if v[stage]]
    if maps:
        maps = maps[-2:]  # the largest size
        fig, axes = plt.subplots(1, len(maps), figsize=(4 * len(maps), 6))
        for ax, (key, stage, matrix) in zip(axes if len(maps) > 1 else [axes], maps):
            im = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=max(max(r) for r in matrix))
            ax.set(title=f"{key} {stage}: selected ratio", xlabel="KV head", ylabel="layer",
                   xticks=range(len(matrix[0])))
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / "kv_heat.png", dpi=120)
        plt.close(fig)
