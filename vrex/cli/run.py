"""``vrex run``: watch a source frame by frame, narrate it, answer questions at their timestamps.

Every option is checked (``vrex.cli.options``) before torch is imported or anything loads.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from vrex.cli.options import POLICY_NAMES, fail
from vrex.models.dtypes import DEFAULT_LM_DTYPE, LM_DTYPES

err = Console(stderr=True)


_QUESTION = re.compile(r"^\s*(?:(\d+):)?(\d+(?:\.\d+)?)\s*:\s*(.+)$", re.S)


def parse_question(spec: str) -> tuple[float, str]:
    """``"12.5:What is shown?"`` or ``"1:30:What is shown?"`` (mm:ss) -> (seconds, text)."""
    m = _QUESTION.match(spec)
    if not m:
        raise typer.BadParameter(f"--ask '{spec}': expected TIME:QUESTION, e.g. '12.5:What is shown?' or '1:30:What is shown?'")
    minutes, seconds, text = m.groups()
    return (int(minutes) * 60 if minutes else 0) + float(seconds), text.strip()


_TIERS = ("KV tiers (all layers together; a tier that is full passes its oldest tokens down: device -> host -> disk; "
          "attention fetches only what the policy selects from the lower tiers). SIZE: bytes with an optional unit, "
          "e.g. 512MB, 2GiB, 1.5G (KB/MB/GB = powers of 1000; KiB/MiB/GiB and K/M/G = powers of 1024).")


def run(
    source: Annotated[str, typer.Argument(help="Video file (mp4/webm/avi/gif...), folder of images or of videos (played back to back), stream URL (rtsp://, http://...), or webcam ('webcam', 'webcam:0', '/dev/video0').")],
    ask: Annotated[Optional[list[str]], typer.Option("--ask", "-a", help="Question at a stream time, 'SECONDS:text' or 'MM:SS:text'. Repeatable. Answered after the first frame at or past that time.")] = None,
    fps: Annotated[float, typer.Option(help="Frames per second fed to the model (resampled from the source with real timestamps). 0 = every frame at the source's native rate.")] = 2.0,
    policy: Annotated[str, typer.Option(help=f"KV selection policy, NAME or NAME\\[key=value,...]: {', '.join(POLICY_NAMES)}. "
                                        "Example: --policy 'resv\\[ratio=0.2,hamming_threshold=4]' (values are Python literals; a bare word is a string, "
                                        "e.g. score_norm=softmax). `vrex policies` lists each policy's parameters and defaults.")] = "full",
    theta: Annotated[float, typer.Option(help="Streaming-EOS threshold in [0, 1]: after a frame the model speaks when P(interval token) < theta (VideoLLM-online demo: 0.725). 0 = never narrate, only answer.")] = 0.725,
    min_gap: Annotated[float, typer.Option(help="Seconds (>= 0) after a narration during which the model stays silent (questions are still answered). 0 = the gate alone decides, as in VideoLLM-online.")] = 0.0,
    max_frames: Annotated[Optional[int], typer.Option(help="Stop after this many frames (>= 1).")] = None,
    lm: Annotated[str, typer.Option(help="Language model: preset 'smollm2-135m', a local directory or Hugging Face repo id (owner/name) of a causal LM transformers runs (Llama, Qwen2, Mistral, Gemma 2/3, Phi-3, GPT-NeoX are tested), or a VideoLLM-online checkpoint (LoRA adapter + connector, e.g. chenjoya/videollm-online-8b-v1plus).")] = "smollm2-135m",
    base_lm: Annotated[Optional[str], typer.Option(help="For a VideoLLM-online checkpoint: local directory (or repo id) of its base LM, instead of the hub id it names.")] = None,
    encoder: Annotated[str, typer.Option(help="Frame encoder: 'efficientnet-lite0' or a SigLIP/CLIP directory or repo id (owner/name).")] = "efficientnet-lite0",
    connector: Annotated[str, typer.Option(help="Connector weights (.safetensors), 'auto' (vrex's default trained weights when shipped: 'narrate'), 'narrate' ('tags' trained further on long many-segment narration streams: keeps naming what it sees over long streams), 'tags' (connector + ImageNet tag tokens + LoRA, trained on 1-5 minute streams: names subjects it was never trained on, recalls a brief event from minutes back; 12 tokens per frame), 'long' (connector + LoRA, the same long-context training without tags), 'plain' (connector only, no LoRA: the lightest, 10 tokens per frame) or 'none' (untrained). Compared in docs/train.md.")] = "auto",
    sample: Annotated[bool, typer.Option(help="Sample (temperature/top-p) instead of greedy decoding.")] = False,
    recent_tokens: Annotated[Optional[int], typer.Option(help="Always-kept window of the newest tokens on top of the policy's selection (retrieval policies need the frames just seen to narrate). Default: the last two frames; 0: the policy alone.")] = None,
    positions: Annotated[str, typer.Option(help="Position strategy past the LM's trained context: 'compress' (re-index old tokens) or 'absolute'.")] = "compress",
    reindex_spread: Annotated[int, typer.Option(metavar="STEPS", help="With --positions compress: move the stored keys to their compressed positions over this many steps, a few layers each, instead of all in one frame (an hour in, one re-index took seconds: the frames that missed real time). 1: all at once. A layer not yet moved computes exactly as before the re-index began. The default moves one layer per frame on LMs of up to 32 layers.")] = 32,
    realtime: Annotated[bool, typer.Option(help="Pace a file at its real speed, as if it were live.")] = False,
    loop: Annotated[bool, typer.Option(help="Play a file or folder again and again on one clock (each pass one frame after the last): a stream of any length from short clips, e.g. an hour of a folder of clips with --max-frames 7200 at 2 fps. Not for URLs and webcams.")] = False,
    trace: Annotated[Optional[Path], typer.Option(help="Write per-step KV telemetry (JSON lines) to this file (its directory must exist).")] = None,
    device_budget: Annotated[Optional[str], typer.Option(metavar="SIZE", help="Device tier: the KV kept where attention runs (the accelerator's memory; on a CPU a budgeted region of RAM with the same accounting). Default: 2048 tokens' worth for offloading policies (flexgen, infinigen, rekv, resv, resv-noclust), unbounded for full and streamingllm. " + _TIERS)] = None,
    host_budget: Annotated[Optional[str], typer.Option(metavar="SIZE", help="Host tier: the KV kept in RAM below the device tier; what exceeds it goes to --disk-dir (required with this option). Default: unbounded.")] = None,
    disk_dir: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Disk tier: memory-mapped KV files in a fresh vrex-kv-* directory inside DIR (created if needed, removed at exit). Needed by --host-budget; without a host budget nothing reaches disk.")] = None,
    kernels: Annotated[str, typer.Option(help="Selection + attention kernels: 'fast' (C++: fused selection, attention read in place from the KV tiers) or 'reference' (the PyTorch path the fast one is tested against: same selections, same outputs within float tolerance).")] = "fast",
    kv_dtype: Annotated[str, typer.Option(help="KV storage type: 'auto' (float32 on CPU, where attention runs in float32; the LM's type elsewhere), 'bfloat16' (half the KV memory; keys and values rounded) or 'float32'.")] = "auto",
    lm_dtype: Annotated[str, typer.Option(help=f"LM weights type: one of {', '.join(LM_DTYPES)} (bfloat16: half the weights each step reads: faster frame and decode steps on CPUs with bf16 matrix units; outputs differ slightly from float32's).")] = DEFAULT_LM_DTYPE,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per event (frame, response, answer) on stdout instead of the live display.")] = False,
    session_dir: Annotated[Optional[Path], typer.Option("--session", metavar="DIR", help="Keep the session on disk in DIR as it goes (K/V, policy state, positions, dialogue, the source's position, every setting; saved after each frame, atomically). Running the same command again after a crash or a stop resumes from the last saved frame and continues exactly as an uninterrupted run. DIR: a new or empty directory, or a saved session (its settings must match).")] = None,
) -> None:
    """Watch SOURCE frame by frame, narrate it, and answer questions at their timestamps.

    Example: [bold]vrex run clip.mp4 --ask "3:What do you see?" --ask "1:10:What happened before?"[/bold]

    Every option is checked before anything loads: a bad value exits with code 2 and a line naming it.
    """
    from vrex.cli.options import run_option_errors
    from vrex.io import VideoSourceError, open_source
    from vrex.sizes import parse_bytes

    errors = run_option_errors(dict(
        fps=fps, max_frames=max_frames, theta=theta, min_gap=min_gap, recent_tokens=recent_tokens, positions=positions,
        reindex_spread=reindex_spread, policy=policy, lm=lm, base_lm=base_lm, encoder=encoder, connector=connector, trace=trace,
        device_budget=device_budget, host_budget=host_budget, disk_dir=disk_dir, kernels=kernels, kv_dtype=kv_dtype,
        lm_dtype=lm_dtype, session=session_dir))
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
    from vrex.cli.durable import StopSignals, open_session, report_stop, resume_event, skip_seen

    stop = StopSignals().__enter__()  # SIGINT/SIGTERM from here on: stop at a frame boundary, cleanly
    skipping = [False]  # a resumed run re-reads the frames it had seen: their warnings were reported then

    def on_warning(warning) -> None:  # vrex.io.SourceWarning: decode problems as events for --json consumers
        if as_json and not skipping[0]:
            print(json.dumps(warning.to_event()), flush=True)

    if as_json:
        import warnings

        from vrex.io import VideoDecodeWarning

        warnings.simplefilter("ignore", VideoDecodeWarning)  # the events carry them; keeps stderr clean
    try:
        src = open_source(source, fps=fps, max_frames=max_frames, realtime=realtime, on_warning=on_warning, loop=loop)
    except VideoSourceError as e:
        fail(str(e))

    from vrex.engine.positions import PositionConfig
    from vrex.engine.session import SessionConfig, StreamingSession
    from vrex.kv.policies import make_policy
    from vrex.kv.store import KVStoreDiskError
    from vrex.kv.telemetry import TelemetryWriter
    from vrex.models.videollm import load_videollm

    try:
        model = load_videollm(lm=lm, encoder=encoder, connector=None if connector == "none" else connector, base_lm=base_lm,
                              lm_dtype=lm_dtype)
    except (FileNotFoundError, ValueError) as e:  # weights a download or a path could not provide, an unsupported model
        fail(str(e))
    for note in model.notes:
        err.print(f"[yellow]note:[/yellow] {note}")
    config = SessionConfig(theta=theta, min_response_gap=min_gap, sample=sample, recent_tokens=recent_tokens,
                           positions=PositionConfig(mode=positions, spread=reindex_spread),
                           device_budget_bytes=None if device_budget is None else parse_bytes(device_budget),
                           host_budget_bytes=None if host_budget is None else parse_bytes(host_budget),
                           disk_dir=None if disk_dir is None else str(disk_dir),
                           kernels=kernels, kv_dtype=None if kv_dtype == "auto" else kv_dtype)
    tracer = TelemetryWriter(trace) if trace else None
    # What must match for --session to resume (the config is compared too).
    settings = {"source": source, "fps": fps, "max_frames": max_frames, "ask": [list(q) for q in questions], "lm": lm,
                "base_lm": base_lm, "encoder": encoder, "connector": connector,
                **({"lm_dtype": lm_dtype} if lm_dtype != DEFAULT_LM_DTYPE else {}),  # sessions saved before the option still resume
                **({"loop": True} if loop else {})}
    session = None
    try:  # the session prefills the system prompt: the first store and trace writes happen here
        session, resumed = open_session(session_dir, model, make_policy(policy), config, settings,
                                        tracer and _TraceSink(tracer, trace))
    except (KVStoreDiskError, TraceWriteError) as e:
        fail(str(e))
    frames = skip_seen(((f.t, f.image) for f in src), session, skipping) if resumed else ((f.t, f.image) for f in src)
    if resumed:
        questions = []  # the saved session holds the questions still to answer
    header = {"kind": "start", "model": model.describe(), "policy": policy, "source": source, "fps": fps,
              "connector_trained": model.connector.trained, "notes": model.notes}
    from vrex.engine.persist import SessionSaveError

    try:
        with src:
            if as_json:
                print(json.dumps(header), flush=True)
                if resumed:
                    print(json.dumps(resume_event(session, session_dir)), flush=True)
                for event in session.run(frames, questions, should_stop=stop):
                    print(json.dumps(event.to_dict()), flush=True)
            else:
                if resumed:
                    err.print(f"resuming session {session_dir} at t={session.t:g} s (frame {session.frames}, "
                              f"{session.cached_tokens} cached tokens)")
                _live_display(session, frames, questions, src, model.describe(), should_stop=stop)
    except (VideoSourceError, KVStoreDiskError, TraceWriteError, SessionSaveError) as e:
        fail(str(e))
    except KeyboardInterrupt:  # a second signal: stop at once (the last save stands)
        pass
    finally:
        if tracer:
            try:
                tracer.close()
            except OSError:
                pass  # already reported: the disk refused the writes
        if session is not None:
            session.close()  # the durable log, and the store's temporary vrex-kv-* directory
        stop.__exit__()
    if stop():
        report_stop(stop, session, session_dir, as_json, lambda line: err.print(line, markup=False, highlight=False))
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


def _live_display(session, frames, questions, src, title: str, should_stop=None) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    total = src.max_frames if src.loop else None  # a loop has no length of its own
    info = src.info
    if info.duration and src.fps and not src.loop:
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
        for event in session.run(frames, questions, should_stop=should_stop):
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
