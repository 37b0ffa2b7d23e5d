"""`vrex bench peer`: the Typer command for llama.cpp on the same weights (the work is in ``vrex.bench.peer``).

Mounted in ``vrex/cli.py`` with ``bench_app.command("peer")(bench_peer)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vrex.bench.peer import DEFAULT_FILL_BLOCK, DEFAULT_SIZES, WEIGHTS


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
