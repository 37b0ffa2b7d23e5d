"""``vrex``: watch a live stream with a video LLM, narrate it, answer questions; benchmark; model hardware.

Thin commands over the library; nothing in vrex imports this module.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from vrex.cli_options import POLICY_NAMES
from vrex.serve.cli import bench_serve, serve


class _Commands(TyperGroup):
    """The root group. Command groups of other packages are imported when used (or listed by
    --help), not at start-up: `vrex run` checks its options before torch is imported. An import
    error in them surfaces as a traceback instead of a vanished command."""

    lazy = {"hw": ("vrex.hw.cli", "app"), "train": ("vrex.train.cli", "train_app"), "eval": ("vrex.train.cli", "eval_app")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), *self.lazy]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy:
            return super().get_command(ctx, name)
        module, attr = self.lazy[name]
        group = typer.main.get_group(getattr(importlib.import_module(module), attr))
        group.name = name
        return group


app = typer.Typer(
    cls=_Commands,
    help="vrex: a streaming video LLM with bounded memory (VideoLLM-online's LIVE loop + V-Rex's ReSV KV retrieval).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)
bench_app = typer.Typer(help="Benchmarks: print a table, write JSON and plots.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.command("serve")(serve)
bench_app.command("serve")(bench_serve)

from vrex.bench.peer_cli import bench_peer  # noqa: E402  (imports llama_cpp only when run)

bench_app.command("peer")(bench_peer)
err = Console(stderr=True)


_QUESTION = re.compile(r"^\s*(?:(\d+):)?(\d+(?:\.\d+)?)\s*:\s*(.+)$", re.S)


def parse_question(spec: str) -> tuple[float, str]:
    """``"12.5:What is shown?"`` or ``"1:30:What is shown?"`` (mm:ss) -> (seconds, text)."""
    m = _QUESTION.match(spec)
    if not m:
        raise typer.BadParameter(f"--ask '{spec}': expected TIME:QUESTION, e.g. '12.5:What is shown?' or '1:30:What is shown?'")
    minutes, seconds, text = m.groups()
    return (int(minutes) * 60 if minutes else 0) + float(seconds), text.strip()


@app.command()
def setup(
    training_media: Annotated[bool, typer.Option("--training-media", help="Also fetch the extra training media of "
                                                 "`vrex train --extra-media vrex/train/media-opencv-doc.json` (Debian's opencv-doc "
                                                 "examples, apt-get download, ~96 MB, once).")] = False,
) -> None:
    """Prepare the default model: convert SmolLM2-135M-Instruct's GGUF to a safetensors cache (once, ~20 s),
    check the EfficientNet-Lite0 weights, and list the demo clips found."""
    from vrex.io import list_demo_clips
    from vrex.models.lm import smollm2_dir
    from vrex.models.weights import efficientnet_lite0_checkpoint

    t0 = time.time()
    err.print(f"LM: {smollm2_dir()}  ({time.time() - t0:.1f} s)")
    err.print(f"encoder: {efficientnet_lite0_checkpoint()}")
    from vrex.kv.fast import FastPathUnavailable, load as load_kernels

    t1 = time.time()
    try:
        err.print(f"fast-path kernels: {load_kernels().__file__}  ({time.time() - t1:.1f} s)")
    except FastPathUnavailable as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    clips = list_demo_clips()
    err.print(f"demo clips: {len(clips)} ({', '.join(sorted(clips)[:6])}{', ...' if len(clips) > 6 else ''})")
    if training_media:
        from vrex.train.debian_media import opencv_doc_examples

        try:
            err.print(f"extra training media: {opencv_doc_examples()}")
        except FileNotFoundError as e:
            err.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2)


_TIERS = ("KV tiers (all layers together; a tier that is full passes its oldest tokens down: device -> host -> disk; "
          "attention fetches only what the policy selects from the lower tiers). SIZE: bytes with an optional unit, "
          "e.g. 512MB, 2GiB, 1.5G (KB/MB/GB = powers of 1000; KiB/MiB/GiB and K/M/G = powers of 1024).")


@app.command()
def run(
    source: Annotated[str, typer.Argument(help="Video file (mp4/webm/avi/gif...), image folder, stream URL (rtsp://, http://...), or webcam ('webcam', 'webcam:0', '/dev/video0').")],
    ask: Annotated[Optional[list[str]], typer.Option("--ask", "-a", help="Question at a stream time, 'SECONDS:text' or 'MM:SS:text'. Repeatable. Answered after the first frame at or past that time.")] = None,
    fps: Annotated[float, typer.Option(help="Frames per second fed to the model (resampled from the source with real timestamps). 0 = every frame at the source's native rate.")] = 2.0,
    policy: Annotated[str, typer.Option(help=f"KV selection policy, NAME or NAME\\[key=value,...]: {', '.join(POLICY_NAMES)}. "
                                        "Example: --policy 'resv\\[ratio=0.2,hamming_threshold=4]' (values are Python literals; a bare word is a string, "
                                        "e.g. score_norm=softmax). `vrex policies` lists each policy's parameters and defaults.")] = "full",
    theta: Annotated[float, typer.Option(help="Streaming-EOS threshold in [0, 1]: after a frame the model speaks when P(interval token) < theta (VideoLLM-online demo: 0.725). 0 = never narrate, only answer.")] = 0.725,
    min_gap: Annotated[float, typer.Option(help="Seconds (>= 0) after a narration during which the model stays silent (questions are still answered). 0 = the gate alone decides, as in VideoLLM-online.")] = 0.0,
    max_frames: Annotated[Optional[int], typer.Option(help="Stop after this many frames (>= 1).")] = None,
    lm: Annotated[str, typer.Option(help="Language model: preset 'smollm2-135m', a local directory or Hugging Face repo id (owner/name) of a Llama/Qwen2-family LM, or a VideoLLM-online checkpoint (LoRA adapter + connector, e.g. chenjoya/videollm-online-8b-v1plus).")] = "smollm2-135m",
    base_lm: Annotated[Optional[str], typer.Option(help="For a VideoLLM-online checkpoint: local directory (or repo id) of its base LM, instead of the hub id it names.")] = None,
    encoder: Annotated[str, typer.Option(help="Frame encoder: 'efficientnet-lite0' or a SigLIP/CLIP directory or repo id (owner/name).")] = "efficientnet-lite0",
    connector: Annotated[str, typer.Option(help="Connector weights (.safetensors), 'auto' (vrex's default trained weights when shipped: 'tags'), 'tags' (connector + ImageNet tag tokens + LoRA, trained on 1-5 minute streams: names subjects it was never trained on, recalls a brief event from minutes back, narrates best; 12 tokens per frame), 'long' (connector + LoRA, the same long-context training without tags), 'plain' (connector only, no LoRA: the lightest, 10 tokens per frame) or 'none' (untrained). Compared in docs/train.md.")] = "auto",
    sample: Annotated[bool, typer.Option(help="Sample (temperature/top-p) instead of greedy decoding.")] = False,
    recent_tokens: Annotated[Optional[int], typer.Option(help="Always-kept window of the newest tokens on top of the policy's selection (retrieval policies need the frames just seen to narrate). Default: the last two frames; 0: the policy alone.")] = None,
    positions: Annotated[str, typer.Option(help="Position strategy past the LM's trained context: 'compress' (re-index old tokens) or 'absolute'.")] = "compress",
    realtime: Annotated[bool, typer.Option(help="Pace a file at its real speed, as if it were live.")] = False,
    trace: Annotated[Optional[Path], typer.Option(help="Write per-step KV telemetry (JSON lines) to this file (its directory must exist).")] = None,
    device_budget: Annotated[Optional[str], typer.Option(metavar="SIZE", help="Device tier: the KV kept where attention runs (the accelerator's memory; on a CPU a budgeted region of RAM with the same accounting). Default: 2048 tokens' worth for offloading policies (flexgen, infinigen, rekv, resv, resv-noclust), unbounded for full and streamingllm. " + _TIERS)] = None,
    host_budget: Annotated[Optional[str], typer.Option(metavar="SIZE", help="Host tier: the KV kept in RAM below the device tier; what exceeds it goes to --disk-dir (required with this option). Default: unbounded.")] = None,
    disk_dir: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Disk tier: memory-mapped KV files in a fresh vrex-kv-* directory inside DIR (created if needed, removed at exit). Needed by --host-budget; without a host budget nothing reaches disk.")] = None,
    kernels: Annotated[str, typer.Option(help="Selection + attention kernels: 'fast' (C++: fused selection, attention read in place from the KV tiers) or 'reference' (the PyTorch path the fast one is tested against: same selections, same outputs within float tolerance).")] = "fast",
    kv_dtype: Annotated[str, typer.Option(help="KV storage type: 'auto' (the LM's dtype), 'bfloat16' (half the KV memory; keys and values rounded) or 'float32'.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per event (frame, response, answer) on stdout instead of the live display.")] = False,
) -> None:
    """Watch SOURCE frame by frame, narrate it, and answer questions at their timestamps.

    Example: [bold]vrex run clip.mp4 --ask "3:What do you see?" --ask "1:10:What happened before?"[/bold]

    Every option is checked before anything loads: a bad value exits with code 2 and a line naming it.
    """
    from vrex.cli_options import run_option_errors
    from vrex.io import VideoSourceError, open_source
    from vrex.sizes import parse_bytes

    errors = run_option_errors(dict(
        fps=fps, max_frames=max_frames, theta=theta, min_gap=min_gap, recent_tokens=recent_tokens, positions=positions,
        policy=policy, lm=lm, base_lm=base_lm, encoder=encoder, connector=connector, trace=trace,
        device_budget=device_budget, host_budget=host_budget, disk_dir=disk_dir, kernels=kernels, kv_dtype=kv_dtype))
    questions = []
    for q in ask or []:
        try:
            questions.append(parse_question(q))
        except typer.BadParameter as e:
            errors.append(e.message)
    if errors:
        for line in errors:
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(2)
    def on_warning(warning) -> None:  # vrex.io.SourceWarning: decode problems as events for --json consumers
        if as_json:
            print(json.dumps(warning.to_event()), flush=True)

    if as_json:
        import warnings

        from vrex.io import VideoDecodeWarning

        warnings.simplefilter("ignore", VideoDecodeWarning)  # the events carry them; keeps stderr clean
    try:
        src = open_source(source, fps=fps, max_frames=max_frames, realtime=realtime, on_warning=on_warning)
    except VideoSourceError as e:
        _fail(str(e))

    from vrex.engine.positions import PositionConfig
    from vrex.engine.session import SessionConfig, StreamingSession
    from vrex.kv.policies import make_policy
    from vrex.kv.store import KVStoreDiskError
    from vrex.kv.telemetry import TelemetryWriter
    from vrex.models.videollm import load_videollm

    try:
        model = load_videollm(lm=lm, encoder=encoder, connector=None if connector == "none" else connector, base_lm=base_lm)
    except (FileNotFoundError, ValueError) as e:  # weights a download or a path could not provide, an unsupported model
        _fail(str(e))
    for note in model.notes:
        err.print(f"[yellow]note:[/yellow] {note}")
    config = SessionConfig(theta=theta, min_response_gap=min_gap, sample=sample, recent_tokens=recent_tokens,
                           positions=PositionConfig(mode=positions),
                           device_budget_bytes=None if device_budget is None else parse_bytes(device_budget),
                           host_budget_bytes=None if host_budget is None else parse_bytes(host_budget),
                           disk_dir=None if disk_dir is None else str(disk_dir),
                           kernels=kernels, kv_dtype=None if kv_dtype == "auto" else kv_dtype)
    tracer = TelemetryWriter(trace) if trace else None
    try:  # the session prefills the system prompt: the first store and trace writes happen here
        session = StreamingSession(model, make_policy(policy), config, trace=tracer and _TraceSink(tracer, trace))
    except (KVStoreDiskError, TraceWriteError) as e:
        _fail(str(e))
    frames = ((f.t, f.image) for f in src)
    header = {"kind": "start", "model": model.describe(), "policy": policy, "source": source, "fps": fps,
              "connector_trained": model.connector.trained, "notes": model.notes}
    try:
        with src:
            if as_json:
                print(json.dumps(header), flush=True)
                for event in session.run(frames, questions):
                    print(json.dumps(event.to_dict()), flush=True)
            else:
                _live_display(session, frames, questions, src, model.describe())
    except (VideoSourceError, KVStoreDiskError, TraceWriteError) as e:
        _fail(str(e))
    finally:
        if tracer:
            try:
                tracer.close()
            except OSError:
                pass  # already reported: the disk refused the writes
    if src.stats.skipped_corrupt:
        err.print(f"[yellow]warning:[/yellow] {src.stats.skipped_corrupt} corrupt frame(s) were skipped")
    end = src.end_of_stream  # vrex.io.SourceEnd: how the source ended (complete, truncated, lost, ...)
    if end is not None:
        if as_json:
            print(json.dumps(end.to_event()), flush=True)
        elif end.status in ("truncated", "lost"):
            err.print(f"[yellow]warning:[/yellow] {end.uri}: stream {end.status}: {end.reason}")


class TraceWriteError(Exception):
    """The --trace file could not be written (full disk, I/O error): the run stops with one line."""


class _TraceSink:
    """The session's telemetry sink: the writer, with write failures named after the --trace file."""

    def __init__(self, writer, path: Path):
        self.writer, self.path = writer, path

    def __call__(self, record, extra=None):
        try:
            return self.writer(record, extra)
        except OSError as e:
            raise TraceWriteError(f"--trace '{self.path}': writing failed: {e.strerror or e}") from e


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def policies() -> None:
    """List the KV policies: what each reads, and its parameters with their types and defaults, for
    [bold]--policy 'NAME\\[key=value,...]'[/bold] (vrex run, vrex eval live, vrex bench kv)."""
    from vrex.kv.policies import POLICIES
    from vrex.kv.policies.spec import describe, param_table

    for name, cls in POLICIES.items():
        typer.echo(f"{name}: {describe(name)}")
        rows = [(p, repr(d), kind) for p, d, kind in param_table(name)] or [("(no parameters)", "", "")]
        w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
        for param, default, kind in rows:
            typer.echo(f"    {param:<{w0}} {'=' if default else ' '} {default:<{w1}}  {kind}".rstrip())
        typer.echo(f"    meanings and ranges: {cls.__module__.replace('.', '/')}.py\n")
    typer.echo("Example: vrex run clip.mp4 --policy 'resv[ratio=0.2,hamming_threshold=4]'")


def _live_display(session, frames, questions, src, title: str) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    total = None
    info = src.info
    if info.duration and src.fps:
        total = int(info.duration * src.fps) + 1
        if src.max_frames:
            total = min(total, src.max_frames)
    columns = [TextColumn("[bold]t={task.fields[t]:>6.1f}s"), BarColumn(), TextColumn("{task.completed}/{task.total} frames"),
               TextColumn("{task.fields[fps]:>5.1f} frames/s"), TextColumn("{task.fields[tokens]:>6} cached tokens"),
               TextColumn("KV {task.fields[kv]:>7.1f} MB"), TextColumn("RSS {task.fields[rss]:>6.0f} MB"), TimeElapsedColumn()]
    console = Console(stderr=True)
    console.print(f"[dim]{title}[/dim]")
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("stream", total=total, t=0.0, fps=0.0, tokens=0, kv=0.0, rss=0.0)
        started = time.perf_counter()
        n = 0
        for event in session.run(frames, questions):
            if event.kind == "frame":
                n += 1
                s = event.stats
                progress.update(task, advance=1, t=event.t, fps=n / (time.perf_counter() - started), tokens=s["cached_tokens"],
                                kv=s["kv_bytes"] / 2**20, rss=s["rss_bytes"] / 2**20)
            elif event.kind == "response":
                progress.console.print(f"[cyan]{event.t:7.1f}s narration:[/cyan] {event.text}")
            else:
                progress.console.print(f"[green]{event.t:7.1f}s Q:[/green] {event.stats['question']}\n"
                                       f"[green]{'':8} A:[/green] {event.text}")


@bench_app.command("stream")
def bench_stream(
    quick: Annotated[bool, typer.Option(help="Sizes 1K, 16K, 64K and policies full, rekv, resv (about 10-15 minutes on 2 cores).")] = False,
    sizes: Annotated[Optional[str], typer.Option(help="Cached-token sizes, comma-separated (k = 1024). Default: 1k,4k,16k,32k,64k,86400 (an hour at 2 fps).")] = None,
    policies: Annotated[Optional[str], typer.Option(help="Policy specs, ';'-separated (e.g. \"full;resv\\[ratio=0.2]\"). Default: full, flexgen, rekv, resv and ReSV tuned.")] = None,
    frames: Annotated[int, typer.Option(min=1, help="Real frame steps timed per row.")] = 5,
    tokens: Annotated[int, typer.Option(min=1, help="Decode steps timed per row.")] = 8,
    kernels: Annotated[str, typer.Option(help="'fast' or 'reference' (see vrex run --kernels).")] = "fast",
    peer: Annotated[Optional[Path], typer.Option(help="peer.json of `make bench-peer` (llama.cpp on the same weights) to draw beside.")] = None,
    out: Annotated[Path, typer.Option(help="Output directory: stream.json (rows), stream-full.json, stream.png.")] = Path("bench-out/stream"),
) -> None:
    """Frame and decode latency, real-time factor at 2 fps, resident KV per tier and fidelity to `full`
    (top-1, KL over >= 300 teacher-forced positions) as a real stream grows towards an hour, per policy."""
    from vrex.bench.stream import FULL_POLICIES, FULL_SIZES, QUICK_POLICIES, QUICK_SIZES, run_stream_bench
    from vrex.kv.policies.spec import PolicySpecError

    if kernels not in ("fast", "reference"):
        raise typer.BadParameter(f"'{kernels}': choose fast or reference", param_hint="--kernels")
    if peer is not None and not peer.is_file():
        raise typer.BadParameter(f"'{peer}': no such file", param_hint="--peer")
    size_list = [_parse_size(s) for s in sizes.split(",")] if sizes else list(QUICK_SIZES if quick else FULL_SIZES)
    specs = [p.strip() for p in policies.split(";") if p.strip()] if policies else list(QUICK_POLICIES if quick else FULL_POLICIES)
    try:
        run_stream_bench(size_list, specs, frames=frames, tokens=tokens, kernels=kernels, out=out, peer=peer,
                         log=lambda line: err.print(line, markup=False))
    except PolicySpecError as e:
        raise typer.BadParameter(str(e), param_hint="--policies")


@bench_app.command("engine")
def bench_engine(
    sizes: Annotated[str, typer.Option(help="Cached-token sizes to measure at, comma-separated (k = 1024).")] = "1k,4k,8k,16k",
    frames: Annotated[int, typer.Option(help="Frame steps timed at each size.")] = 8,
    tokens: Annotated[int, typer.Option(help="Decode steps timed at each size.")] = 16,
    out: Annotated[Path, typer.Option(help="Output directory for JSON and plots.")] = Path("bench-out/engine"),
) -> None:
    """Per-frame latency (vision, prefill, total) and per-token decode latency of the `full` policy at growing
    cached-token counts, and peak memory, on real clips. The baseline the ReSV policies must beat."""
    from vrex.bench.engine import run_engine_bench

    run_engine_bench([_parse_size(s) for s in sizes.split(",")], frames=frames, tokens=tokens, out=out)


def _parse_size(text: str) -> int:
    from vrex.sizes import parse_count

    try:
        return parse_count(text)
    except ValueError as e:
        raise typer.BadParameter(str(e))


@bench_app.command("kv", context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def bench_kv(ctx: typer.Context) -> None:
    """All KV policies side by side (latency, selected ratios, fidelity to full, memory, bytes moved). `vrex bench kv --help` for options."""
    from typer.main import get_command

    from vrex.bench.kv import kv_command

    sub = typer.Typer()
    sub.command(name="kv", help=kv_command.__doc__)(kv_command)
    get_command(sub).main(args=ctx.args, prog_name="vrex bench kv", standalone_mode=True)


if __name__ == "__main__":
    app(sys.argv[1:])
