"""``vrex bench``: side-by-side benchmarks (the work is in ``vrex.bench`` and ``vrex.serve.bench``).

Commands: ``stream`` (latency and fidelity as a stream grows towards an hour), ``engine`` (the ``full``
policy's latency), ``kv`` (every policy side by side), ``serve`` (concurrent clients against a real
server), ``peer`` (llama.cpp on the same weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vrex.bench.peer import DEFAULT_FILL_BLOCK, DEFAULT_SIZES, WEIGHTS
from vrex.cli.options import LM_PRESETS, POLICY_NAMES, check_policy_specs, choice_error, fail, lm_errors, log, model_ref_error, recent_tokens_error, require_extra
from vrex.models.dtypes import DEFAULT_LM_DTYPE, KV_DTYPES, LM_DTYPES

app = typer.Typer(help="Benchmarks: print a table, write JSON and plots.", no_args_is_help=True)
err = Console(stderr=True, width=160)


@app.command("stream")
def bench_stream(
    quick: Annotated[bool, typer.Option(help="Sizes 1K, 16K, 64K, policies full, rekv, resv, a fill window of 2048 tokens (the shortest run; README: its time).")] = False,
    sizes: Annotated[Optional[str], typer.Option(help="Cached-token sizes, comma-separated (k = 1024). Default: 1k,4k,16k,32k,64k,86400 (an hour at 2 fps).")] = None,
    policies: Annotated[Optional[str], typer.Option(help="Policy specs, ';'-separated (e.g. \"full;resv\\[ratio=0.2]\"). Default: full, flexgen, rekv, resv and ReSV tuned.")] = None,
    frames: Annotated[int, typer.Option(min=1, help="Real frame steps timed per row.")] = 5,
    tokens: Annotated[int, typer.Option(min=1, help="Decode steps timed per row.")] = 8,
    kernels: Annotated[str, typer.Option(help="'fast' or 'reference' (see vrex run --kernels).")] = "fast",
    fill_window: Annotated[Optional[int], typer.Option(min=0, help="How the cache is filled between sizes: 0 attends to the whole past (exact; quadratic in the cached length, by far the longest part of a run to 64K), W attends to the prompt and the last W tokens (linear). Measured steps always read every cached token their policy selects. Default: 2048 with --quick, else 0.")] = None,
    peer: Annotated[Optional[Path], typer.Option(help="peer.json of `make bench-peer` (llama.cpp on the same weights) to draw beside.")] = None,
    lm: Annotated[str, typer.Option(help="Language model: the preset, a causal-LM directory or a repo id (see vrex run --lm); another LM runs with an untrained connector.")] = "smollm2-135m",
    lm_dtype: Annotated[str, typer.Option(help=f"LM weights type: {' or '.join(LM_DTYPES)} (see vrex run --lm-dtype).")] = DEFAULT_LM_DTYPE,
    kv_dtype: Annotated[str, typer.Option(help="KV storage type of the measured forks: auto, bfloat16 or float32 (see vrex run --kv-dtype); the fill keeps auto, and fidelity is against `full` in the same type.")] = "auto",
    out: Annotated[Path, typer.Option(help="Output directory: stream.json (rows), stream-full.json, stream.png.")] = Path("bench-out/stream"),
) -> None:
    """Frame and decode latency, real-time factor at 2 fps, resident KV per tier and fidelity to `full`
    (top-1, KL over >= 300 teacher-forced positions) as a real stream grows towards an hour, per policy."""
    if kernels not in ("fast", "reference"):
        raise typer.BadParameter(f"'{kernels}': choose fast or reference", param_hint="--kernels")
    if error := choice_error("--lm-dtype", lm_dtype, LM_DTYPES):
        fail(error)
    if error := choice_error("--kv-dtype", kv_dtype, KV_DTYPES):
        fail(error)
    if peer is not None and not peer.is_file():
        raise typer.BadParameter(f"'{peer}': no such file", param_hint="--peer")
    if error := model_ref_error("--lm", lm, LM_PRESETS, "language model"):
        fail(error)
    size_list = [_parse_size(s) for s in sizes.split(",")] if sizes else None
    specs = _checked_specs(policies, ";", "--policies")  # the defaults below are valid policies
    # transformers and the engine: imported after every option is checked (an error in under 2 s)
    from vrex.bench.stream import FULL_POLICIES, FULL_SIZES, QUICK_FILL_WINDOW, QUICK_POLICIES, QUICK_SIZES, run_stream_bench

    size_list = size_list or list(QUICK_SIZES if quick else FULL_SIZES)
    specs = specs or list(QUICK_POLICIES if quick else FULL_POLICIES)
    try:
        run_stream_bench(size_list, specs, frames=frames, tokens=tokens, kernels=kernels, out=out, peer=peer,
                         log=log, lm=lm, lm_dtype=lm_dtype, kv_dtype=None if kv_dtype == "auto" else kv_dtype,
                         fill_window=(QUICK_FILL_WINDOW if quick else 0) if fill_window is None else fill_window)
    except lm_errors() as e:  # an LM a path or download could not provide, or the engine cannot run
        fail(f"--lm: {e}")


@app.command("streams")
def bench_streams(
    quick: Annotated[bool, typer.Option(help="1 and 4 streams at 1K, batched and separate, full only (the shortest run).")] = False,
    counts: Annotated[Optional[str], typer.Option(help="Stream counts, comma-separated. Default 1,2,4,8.")] = None,
    sizes: Annotated[Optional[str], typer.Option(help="Cached tokens per stream, comma-separated (k = 1024). Default 1k,16k.")] = None,
    policies: Annotated[Optional[str], typer.Option(help="Policy specs, ';'-separated. Default: full;resv.")] = None,
    modes: Annotated[Optional[str], typer.Option(help="batched, separate or both (comma-separated). Default both.")] = None,
    frames: Annotated[int, typer.Option(min=2, help="Frame steps timed per stream and row (after 2 untimed).")] = 16,
    kernels: Annotated[str, typer.Option(help="'fast' or 'reference' (see vrex run --kernels).")] = "fast",
    lm_dtype: Annotated[str, typer.Option(help=f"LM weights type, in the batched engine and every separate process alike: {' or '.join(LM_DTYPES)} (see vrex run --lm-dtype).")] = DEFAULT_LM_DTYPE,
    out: Annotated[Path, typer.Option(help="Output directory: streams.json (rows), streams-full.json, streams.png.")] = Path("bench-out/streams"),
) -> None:
    """Aggregate frames/s and p50/p99 per-frame latency of B live streams at one cached length:
    one batched engine against one process per stream, per policy."""
    if kernels not in ("fast", "reference"):
        fail(f"--kernels: '{kernels}': choose fast or reference")
    if error := choice_error("--lm-dtype", lm_dtype, LM_DTYPES):
        fail(error)
    try:
        count_list = [int(c) for c in counts.split(",")] if counts else None
    except ValueError:
        fail(f"--counts: '{counts}': give whole numbers, e.g. 1,2,4,8")
    if count_list and min(count_list) < 1:
        fail(f"--counts: '{counts}': every count must be >= 1")
    mode_list = [m.strip() for m in modes.split(",")] if modes else None
    bad = [m for m in mode_list or [] if m not in ("batched", "separate")]
    if bad:
        fail(f"--modes: '{bad[0]}': choose batched or separate")
    size_list = [_parse_size(s) for s in sizes.split(",")] if sizes else None
    specs = _checked_specs(policies, ";", "--policies")
    from vrex.bench.streams import FULL, QUICK, run_streams_bench  # the engine: after every option is checked

    base = QUICK if quick else FULL
    count_list, mode_list = count_list or list(base["counts"]), mode_list or list(base["modes"])
    size_list, specs = size_list or list(base["sizes"]), specs or list(base["policies"])
    run_streams_bench(counts=count_list, sizes=size_list, modes=mode_list, policies=specs, frames=frames,
                      kernels=kernels, lm_dtype=lm_dtype, out=out, log=log)


@app.command("engine")
def bench_engine(
    sizes: Annotated[str, typer.Option(help="Cached-token sizes to measure at, comma-separated (k = 1024).")] = "1k,4k,8k,16k",
    frames: Annotated[int, typer.Option(help="Frame steps timed at each size.")] = 8,
    tokens: Annotated[int, typer.Option(help="Decode steps timed at each size.")] = 16,
    out: Annotated[Path, typer.Option(help="Output directory for JSON and plots.")] = Path("bench-out/engine"),
) -> None:
    """Per-frame latency (vision, prefill, total) and per-token decode latency of the `full` policy at growing
    cached-token counts, and peak memory, on real clips. The baseline the ReSV policies must beat."""
    size_list = [_parse_size(s) for s in sizes.split(",")]
    from vrex.bench.engine import run_engine_bench  # the engine: after the option is checked

    rows = run_engine_bench(size_list, frames=frames, tokens=tokens, out=out, log=log)
    _engine_table(rows)
    err.print(f"wrote {out / 'engine.json'} and {out / 'engine.png'}", markup=False)


def _checked_specs(text: str | None, sep: str, option: str) -> list[str] | None:
    """``text``'s policy specs split on ``sep``, each checked (no model needed), or None when not given;
    a bad one, or none at all, exits 2 naming ``option``."""
    if not text:
        return None
    specs = [p.strip() for p in text.split(sep) if p.strip()]
    if not specs:
        raise typer.BadParameter(f"'{text}' names no policy; give specs separated by '{sep}', e.g. full{sep}resv", param_hint=option)
    check_policy_specs(specs, option)
    return specs


def _parse_size(text: str) -> int:
    from vrex.sizes import parse_count

    try:
        return parse_count(text)
    except ValueError as e:
        raise typer.BadParameter(str(e))


@app.command("kv")
def bench_kv(
    policies: Annotated[str, typer.Option(help=f"Comma-separated policies, or 'all' ({', '.join(POLICY_NAMES)}). Parameters in brackets: 'all,resv\\[ratio=0.6,score_norm=softmax],rekv\\[ratio=0.25]' (`vrex policies` lists them).")] = "all",
    sizes: Annotated[str, typer.Option(help="Cached-token sizes (k = 1024). The LM's trained context is 8k: 16k runs beyond it with re-indexed positions.")] = "1k,4k,8k,16k",
    frames: Annotated[int, typer.Option(help="Real frame steps measured per policy and size.")] = 4,
    questions: Annotated[int, typer.Option(help="Questions per policy and size (at least 1; more than the bench's question list: all of them).")] = 2,
    answer_tokens: Annotated[int, typer.Option(help="Tokens decoded per question (full's greedy tokens, teacher-forced for the others; decoding goes on past a stop token so latency is always measured).")] = 12,
    device_tokens: Annotated[int, typer.Option(help="Device-tier budget for offloading policies, in tokens (all layers).")] = 1024,
    recent_tokens: Annotated[int, typer.Option(help="Always-kept recent window, in tokens, for every policy.")] = 22,
    quick: Annotated[bool, typer.Option(help="Smaller sweep: all policies, 1k/2k/4k, 3 frames, 1 question.")] = False,
    lm: Annotated[str, typer.Option(help="Language model: the preset, a causal-LM directory or a repo id (see vrex run --lm); another LM runs with an untrained connector.")] = "smollm2-135m",
    out: Annotated[Path, typer.Option(help="Output directory (kv.json, kv_latency.png, kv_heat.png).")] = Path("bench-out/kv"),
) -> None:
    """All KV policies side by side on the real SmolLM2 weights and real clips: latency, selected-token
    ratios (frame prefill and decoding), fidelity to `full` (top-1, KL, answers), memory per tier, bytes moved."""
    from vrex.kv.policies import POLICIES, PolicySpecError
    from vrex.kv.policies.spec import split_spec_list

    if error := recent_tokens_error(recent_tokens):
        fail(error)
    if error := model_ref_error("--lm", lm, LM_PRESETS, "language model"):
        fail(error)
    names = []
    try:
        specs = split_spec_list(policies)
    except PolicySpecError as e:
        raise typer.BadParameter(str(e), param_hint="--policies")
    for spec in specs:
        names += list(POLICIES) if spec == "all" else [spec]
    check_policy_specs(names, "--policies")
    size_list = [1024, 2048, 4096] if quick else [_parse_size(s) for s in sizes.split(",")]
    if quick:
        frames, questions = min(frames, 3), 1
    from vrex.bench.kv import QUESTIONS, run_kv_bench  # transformers and the engine: after every option is checked

    try:
        rows = run_kv_bench(names, size_list, frames=frames, n_questions=max(1, min(questions, len(QUESTIONS))),
                            answer_tokens=answer_tokens, device_tokens=device_tokens, recent_tokens=recent_tokens, out=out,
                            log=log, lm=lm)
    except lm_errors() as e:  # an LM a path or download could not provide, or the engine cannot run
        fail(f"--lm: {e}")
    _kv_table(rows)
    err.print(f"wrote {out / 'kv.json'}, {out / 'kv_latency.png'}, {out / 'kv_heat.png'}", markup=False)


def _kv_table(rows: list[dict]) -> None:
    from vrex.bench.kv import pct

    table = Table(title="KV policies side by side (fidelity vs full on identical inputs)")
    for col in ("tokens", "policy", "frame ms", "token ms", "frame ratio", "decode ratio", "top-1", "KL", "answers", "resident MB", "moved MB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["cached_tokens"]), escape(r["policy"]), f"{r['frame_ms']:.1f}", f"{r['token_ms'] or 0:.1f}", pct(r["frame_ratio"]),
                      pct(r["decode_ratio"]), f"{r['top1_agreement']:.3f}", f"{r['kl']:.4f}", f"{r['answer_agreement']:.2f}",
                      f"{r['resident_bytes'] / 2**20:.0f}", f"{r['bytes_moved'] / 2**20:.1f}")
    err.print(table)


def _engine_table(rows: list[dict]) -> None:
    table = Table(title="full policy: latency vs cached tokens (medians)")
    for col in ("cached tokens", "vision ms", "prefill ms", "frame ms", "decode ms/token", "KV MB", "peak RSS MB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["cached_tokens"]), f"{r['vision_ms']:.1f}", f"{r['prefill_ms']:.1f}", f"{r['frame_ms']:.1f}",
                      f"{r['token_ms']:.1f}", f"{r['kv_bytes'] / 2**20:.0f}", f"{r['peak_rss_bytes'] / 2**20:.0f}")
    err.print(table)


@app.command("serve")
def bench_serve(
    sessions: Annotated[str, typer.Option(help="Comma-separated numbers of concurrent sessions.")] = "1,2,4",
    fps: Annotated[float, typer.Option(help="Frames per second each webcam-like client sends.")] = 2.0,
    seconds: Annotated[float, typer.Option(help="Streaming time per configuration.")] = 20.0,
    policy: Annotated[str, typer.Option(help="KV policy of every session.")] = "full",
    threads: Annotated[int, typer.Option(help="Torch threads of the model worker.")] = 2,
    out: Annotated[Path, typer.Option(help="JSON output (a PNG plot is written beside it).")] = Path("docs/figures/serve_bench.json"),
) -> None:
    """N webcam-like clients at once against a real server (HTTP, real frames of the shared clips):
    frames processed and dropped per second, p50/p99 frame latency, answer latency."""
    require_extra("vrex bench serve", "serve", "fastapi", "uvicorn", "websockets", "httpx")
    from vrex.serve.bench import format_table, run_bench

    try:
        counts = [int(x) for x in sessions.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected numbers like 1,2,4, got {sessions!r}", param_hint="--sessions")
    if not counts or min(counts) < 1 or fps <= 0 or seconds <= 0:
        raise typer.BadParameter("sessions, fps and seconds must be positive")
    result = run_bench(counts, fps=fps, seconds=seconds, policy=policy, threads=threads, out=out, log=err.print)
    print(format_table(result))
    err.print(f"wrote {out} and {out.with_suffix('.png')}")


@app.command("peer")
def bench_peer(
    out: Annotated[Path, typer.Option(help="Output directory (peer.json).")] = Path("bench-out/peer"),
    sizes: Annotated[str, typer.Option(help="Cached-token sizes, comma-separated (k = 1024).")] = DEFAULT_SIZES,
    threads: Annotated[int, typer.Option(help="llama.cpp threads for prefill and decode.")] = 2,
    weights: Annotated[str, typer.Option(help="Q4_1 (the shipped GGUF), F16 (made from it), or both.")] = ",".join(WEIGHTS),
    reps: Annotated[int, typer.Option(help="Timed repetitions per step and size (medians reported).")] = 7,
    flash_attn: Annotated[str, typer.Option(help="Flash attention: off (llama-cpp-python's default), on (llama.cpp's CPU default), or off,on.")] = "off,on",
    fill_block: Annotated[int, typer.Option(help="Real prefill up to this many tokens, copies of their K/V beyond (0: all real).")] = DEFAULT_FILL_BLOCK,
) -> None:
    """llama.cpp (llama-cpp-python, optional extra: `make bench-peer`) on SmolLM2's GGUF: 12-token prefill and 1-token decode."""
    from vrex.bench.peer import main

    code = main(["--out", str(out), "--sizes", sizes, "--threads", str(threads), "--weights", weights, "--reps", str(reps),
                 "--flash-attn", flash_attn, "--fill-block", str(fill_block)])
    if code:
        raise typer.Exit(code)


from vrex.cli.soak import bench_soak  # noqa: E402  (its own module: options and checks of the soak benchmark)

app.command("soak")(bench_soak)
