"""``vrex serve`` and ``vrex bench serve`` (Typer commands; registered in ``vrex.cli``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

err = Console(stderr=True)


def serve(
    host: Annotated[str, typer.Option(help="Address to bind. Anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind (0: any free port).")] = 8000,
    token: Annotated[Optional[str], typer.Option(help="Secret every API request must carry ('Authorization: Bearer ...'); "
                                                 "'auto' generates one. Required with a non-loopback --host.")] = None,
    policy: Annotated[str, typer.Option(help="Default KV policy offered by the page (name or spec string).")] = "full",
    media_dir: Annotated[Optional[Path], typer.Option(help="Let clients play video files from this folder (by name, never a path outside it).")] = None,
    allow_urls: Annotated[bool, typer.Option(help="Let clients have the server open stream URLs (rtsp://, http(s)://...).")] = False,
    max_sessions: Annotated[int, typer.Option(help="Sessions at once (each has its own KV cache).")] = 4,
    max_fps: Annotated[float, typer.Option(help="Highest frame rate a session may ask for.")] = 4.0,
    max_upload_mb: Annotated[float, typer.Option(help="Largest uploaded video, MiB.")] = 200.0,
    allow_origin: Annotated[Optional[list[str]], typer.Option(help="Extra page origin allowed to use the API from a browser (repeatable).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Torch threads for the model (default: torch's choice).")] = None,
    connector: Annotated[str, typer.Option(help="Model weights, as `vrex run --connector`.")] = "auto",
) -> None:
    """Serve a live video assistant: open the printed address, point a camera (or upload a video),
    read the narrations, ask questions, and see which moments each answer read.

    API documentation at /docs on the same address."""
    from vrex.serve.auth import resolve_token

    try:
        secret = resolve_token(host, token)
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    if media_dir is not None and not media_dir.is_dir():
        raise typer.BadParameter(f"{media_dir} is not a folder", param_hint="--media-dir")
    if max_sessions < 1 or max_fps <= 0 or max_upload_mb <= 0:
        raise typer.BadParameter("--max-sessions, --max-fps and --max-upload-mb must be positive")
    from vrex.kv.policies import make_policy
    from vrex.serve.hub import ServeConfig
    from vrex.serve.limits import ServeLimits

    try:
        make_policy(policy)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--policy")
    limits = ServeLimits(max_sessions=max_sessions, max_fps=max_fps, max_upload_bytes=int(max_upload_mb * 2**20))
    config = ServeConfig(host=host, port=port, token=secret, limits=limits, media_dir=media_dir, allow_urls=allow_urls,
                         allowed_origins=tuple(allow_origin or ()), threads=threads, default_policy=policy)
    from vrex.models.videollm import load_videollm
    from vrex.serve.server import serve_forever

    err.print("loading the model...")
    model = load_videollm(connector=None if connector == "none" else connector)
    for note in model.notes:
        err.print(f"[yellow]note:[/yellow] {note}")
    try:
        serve_forever(model, config, announce=lambda url: err.print(
            f"vrex serve: open [bold]{url}[/bold]  (API docs: {url.split('#')[0]}docs; Ctrl-C stops)"))
    except OSError as e:
        err.print(f"[red]error:[/red] cannot bind {host}:{port}: {e}")
        raise typer.Exit(2)


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
