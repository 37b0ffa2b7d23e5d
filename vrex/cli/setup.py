"""``vrex setup`` (prepare the default model and the fast path) and ``vrex policies`` (every KV policy
with its parameters)."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.console import Console

err = Console(stderr=True)


def setup(
    training_media: Annotated[bool, typer.Option("--training-media", help="Also fetch the extra training media of "
                                                 "`vrex train --extra-media vrex/train/media-opencv-doc.json` (Debian's opencv-doc "
                                                 "examples, apt-get download, once).")] = False,
) -> None:
    """Prepare the default model: convert SmolLM2-135M-Instruct's GGUF to a safetensors cache (once),
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
