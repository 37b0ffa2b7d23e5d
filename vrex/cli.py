"""``vrex``: watch a live stream with a video LLM, narrate it, answer questions; benchmark; model hardware.

Thin commands over the library; nothing in vrex imports this module.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(
    help="vrex: a streaming video LLM with bounded memory (VideoLLM-online's LIVE loop + V-Rex's ReSV KV retrieval).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)
bench_app = typer.Typer(help="Benchmarks: print a table, write JSON and plots.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
err = Console(stderr=True)


def _mount_optional(module: str, attr: str, name: str) -> None:
    """Sub-apps living in other packages (hardware models, training) mount themselves when present."""
    try:
        sub = getattr(__import__(module, fromlist=[attr]), attr)
    except (ImportError, AttributeError):
        return
    app.add_typer(sub, name=name)


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
    clips = list_demo_clips()
    err.print(f"demo clips: {len(clips)} ({', '.join(sorted(clips)[:6])}{', ...' if len(clips) > 6 else ''})")
    if training_media:
        from vrex.train.debian_media import opencv_doc_examples

        try:
            err.print(f"extra training media: {opencv_doc_examples()}")
        except FileNotFoundError as e:
            err.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2)


@app.command()
def run(
    source: Annotated[str, typer.Argument(help="Video file (mp4/webm/avi/gif...), image folder, stream URL (rtsp://, http://...), or webcam ('webcam', 'webcam:0', '/dev/video0').")],
    ask: Annotated[Optional[list[str]], typer.Option("--ask", "-a", help="Question at a stream time, 'SECONDS:text' or 'MM:SS:text'. Repeatable. Answered after the first frame at or past that time.")] = None,
    fps: Annotated[float, typer.Option(help="Frames per second fed to the model (resampled from the source with real timestamps).")] = 2.0,
    policy: Annotated[str, typer.Option(help="KV selection policy: full, flexgen, infinigen, rekv, streamingllm, resv, resv-noclust.")] = "full",
    theta: Annotated[float, typer.Option(help="Streaming-EOS threshold: after a frame the model speaks when P(interval token) < theta (VideoLLM-online demo: 0.725). 0 = never narrate, only answer.")] = 0.725,
    min_gap: Annotated[float, typer.Option(help="Seconds after a narration during which the model stays silent (questions are still answered). 0 = the gate alone decides, as in VideoLLM-online.")] = 0.0,
    max_frames: Annotated[Optional[int], typer.Option(help="Stop after this many frames.")] = None,
    lm: Annotated[str, typer.Option(help="Language model: preset 'smollm2-135m', a local directory or Hugging Face repo id of a Llama/Qwen2-family LM, or a VideoLLM-online checkpoint (LoRA adapter + connector, e.g. chenjoya/videollm-online-8b-v1plus).")] = "smollm2-135m",
    base_lm: Annotated[Optional[str], typer.Option(help="For a VideoLLM-online checkpoint: local directory of its base LM (instead of the hub id it names).")] = None,
    encoder: Annotated[str, typer.Option(help="Frame encoder: 'efficientnet-lite0' or a SigLIP/CLIP directory or repo id.")] = "efficientnet-lite0",
    connector: Annotated[str, typer.Option(help="Connector weights (.safetensors), 'auto' (vrex's default trained weights when shipped: 'tags'), 'tags' (connector + ImageNet tag tokens + LoRA, trained on 1-5 minute streams: names subjects it was never trained on, recalls a brief event from minutes back, narrates best; 12 tokens per frame), 'long' (connector + LoRA, the same long-context training without tags), 'plain' (connector only, no LoRA: the lightest, 10 tokens per frame) or 'none' (untrained). Measured side by side in docs/train.md.")] = "auto",
    sample: Annotated[bool, typer.Option(help="Sample (temperature/top-p) instead of greedy decoding.")] = False,
    recent_tokens: Annotated[Optional[int], typer.Option(help="Always-kept window of the newest tokens on top of the policy's selection (retrieval policies need the frames just seen to narrate). Default: the last two frames; 0: the policy alone.")] = None,
    positions: Annotated[str, typer.Option(help="Position strategy past the LM's trained context: 'compress' (re-index old tokens) or 'absolute'.")] = "compress",
    realtime: Annotated[bool, typer.Option(help="Pace a file at its real speed, as if it were live.")] = False,
    trace: Annotated[Optional[Path], typer.Option(help="Write per-step KV telemetry (JSON lines) to this file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per event (frame, response, answer) on stdout instead of the live display.")] = False,
) -> None:
    """Watch SOURCE frame by frame, narrate it, and answer questions at their timestamps.

    Example: [bold]vrex run clip.mp4 --ask "3:What do you see?" --ask "1:10:What happened before?"[/bold]
    """
    from vrex.engine.positions import PositionConfig
    from vrex.engine.session import SessionConfig, StreamingSession
    from vrex.io import VideoSourceError, open_source
    from vrex.kv.policies import make_policy
    from vrex.kv.telemetry import TelemetryWriter
    from vrex.models.videollm import load_videollm

    questions = [parse_question(q) for q in ask or []]
    if recent_tokens is not None and recent_tokens < 0:
        raise typer.BadParameter(f"must be >= 0, got {recent_tokens}", param_hint="--recent-tokens")
    try:
        src = open_source(source, fps=fps, max_frames=max_frames, realtime=realtime)
    except VideoSourceError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    model = load_videollm(lm=lm, encoder=encoder, connector=None if connector == "none" else connector, base_lm=base_lm)
    for note in model.notes:
        err.print(f"[yellow]note:[/yellow] {note}")
    config = SessionConfig(theta=theta, min_response_gap=min_gap, sample=sample, recent_tokens=recent_tokens,
                           positions=PositionConfig(mode=positions))
    tracer = TelemetryWriter(trace) if trace else None
    session = StreamingSession(model, make_policy(policy), config, trace=tracer)
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
    except VideoSourceError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    finally:
        if tracer:
            tracer.close()
    if src.stats.skipped_corrupt:
        err.print(f"[yellow]warning:[/yellow] {src.stats.skipped_corrupt} corrupt frame(s) were skipped")


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
    from vrex.bench import parse_size

    try:
        return parse_size(text)
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
_mount_optional("vrex.hw.cli", "app", "hw")
_mount_optional("vrex.train.cli", "train_app", "train")
_mount_optional("vrex.train.cli", "eval_app", "eval")

if __name__ == "__main__":
    app(sys.argv[1:])
