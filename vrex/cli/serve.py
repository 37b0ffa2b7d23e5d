"""``vrex serve``: the live video assistant in the browser (the work is in ``vrex.serve``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from vrex.cli.options import require_extra

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
    sessions_dir: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Save every session in DIR/<id> as it goes (the format of `vrex run --session`). "
                                                         "A server restarted on the same DIR resumes a session when a client names its id "
                                                         "(POST /api/sessions/<id>/resume, or any request for it), from its last saved frame; "
                                                         "DELETE /api/sessions/<id> removes its directory.")] = None,
    cluster: Annotated[Optional[str], typer.Option(metavar="ADDRESS", help="Run the sessions on Ray actors (vrex.cluster) instead of this process: "
                                                   "'local' starts a Ray here, bound to 127.0.0.1; 'auto' joins the cluster this machine "
                                                   "belongs to (`ray start`); HOST:PORT or ray://HOST:10001 a given head. Each actor loads "
                                                   "the model (--connector, --threads); the server loads none. A session whose actor dies "
                                                   "fails with an error naming it, the actor and the cause; with --sessions-dir, "
                                                   "POST /api/sessions/<id>/resume restarts it from its last save on a new actor.")] = None,
    actors: Annotated[Optional[int], typer.Option(help="With --cluster: engine actors, one model each (default 1); "
                                                  "new sessions go to the one with the fewest.")] = None,
) -> None:
    """Serve a live video assistant: open the printed address, point a camera (or upload a video),
    read the narrations, ask questions, and see which moments each answer read.

    API documentation at /docs on the same address."""
    require_extra("vrex serve", "serve", "fastapi", "uvicorn", "websockets")
    from vrex.serve.auth import resolve_token

    try:
        secret = resolve_token(host, token)
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    if media_dir is not None and not media_dir.is_dir():
        raise typer.BadParameter(f"{media_dir} is not a folder", param_hint="--media-dir")
    if sessions_dir is not None:
        try:
            sessions_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise typer.BadParameter(f"{sessions_dir}: cannot create it ({e.strerror or e})", param_hint="--sessions-dir")
        if not os.access(sessions_dir, os.W_OK | os.X_OK):
            raise typer.BadParameter(f"{sessions_dir} is not writable", param_hint="--sessions-dir")
    if max_sessions < 1 or max_fps <= 0 or max_upload_mb <= 0:
        raise typer.BadParameter("--max-sessions, --max-fps and --max-upload-mb must be positive")
    if actors is not None and cluster is None:
        raise typer.BadParameter("--actors needs --cluster (e.g. --cluster local --actors 2)", param_hint="--actors")
    if actors is not None and actors < 1:
        raise typer.BadParameter(f"{actors}: give at least one actor", param_hint="--actors")
    if cluster is not None:
        if not cluster.strip():
            raise typer.BadParameter("give 'local', 'auto', HOST:PORT or ray://HOST:10001", param_hint="--cluster")
        require_extra("vrex serve --cluster", "cluster", "ray")
        if cluster.strip() != "local":
            from vrex.cluster.client import check_address

            try:
                check_address(cluster.strip())
            except (ValueError, ConnectionError) as e:
                raise typer.BadParameter(str(e), param_hint="--cluster")
    from vrex.kv.policies import make_policy
    from vrex.serve.hub import ClusterConfig, ServeConfig
    from vrex.serve.limits import ServeLimits

    try:
        make_policy(policy)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--policy")
    limits = ServeLimits(max_sessions=max_sessions, max_fps=max_fps, max_upload_bytes=int(max_upload_mb * 2**20))
    config = ServeConfig(host=host, port=port, token=secret, limits=limits, media_dir=media_dir, allow_urls=allow_urls,
                         allowed_origins=tuple(allow_origin or ()), threads=threads, default_policy=policy,
                         sessions_dir=sessions_dir)
    from vrex.models.videollm import load_videollm
    from vrex.serve.server import serve_forever

    weights = None if connector == "none" else connector
    model = None
    if cluster is not None:
        config.cluster = ClusterConfig(address=cluster.strip(), actors=actors or 1, connector=weights)
        err.print(f"starting {config.cluster.actors} Ray actor(s) on {cluster} (each loads the model)...")
    else:
        err.print("loading the model...")
        model = load_videollm(connector=weights)
        for note in model.notes:
            err.print(f"[yellow]note:[/yellow] {note}")
    try:
        serve_forever(model, config, announce=lambda url: err.print(
            f"vrex serve: open [bold]{url}[/bold]  (API docs: {url.split('#')[0]}docs; Ctrl-C stops)"))
    except OSError as e:
        err.print(f"[red]error:[/red] cannot bind {host}:{port}: {e}")
        raise typer.Exit(2)
    except RuntimeError as e:  # --cluster: Ray or its actors did not start (the message says which)
        if cluster is None:
            raise
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
