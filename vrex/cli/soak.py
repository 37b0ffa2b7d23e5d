"""``vrex bench soak``: RSS and KV tier bytes over a long real stream (the work is in ``vrex.bench.soak``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vrex.cli.options import choice_error, directory_error, fail, log, make_directory, policy_error, size_error
from vrex.models.dtypes import KV_DTYPES


def bench_soak(
    minutes: Annotated[float, typer.Option(help="Stream minutes to play (the shared clips, looped).")] = 60.0,
    fps: Annotated[float, typer.Option(help="Frames per second taken from the clips (every frame enters the cache).")] = 2.0,
    stride: Annotated[int, typer.Option(help="Every STRIDE-th frame is a real step (vision, prefill, gate, narration); the frames "
                                        "between are fast-forwarded (encoded and prefilled in one chunk, no gate). 1: every frame real.")] = 10,
    policies: Annotated[str, typer.Option(help="Policy specs, ';'-separated; one run each.")] = "full;resv",
    device_budget: Annotated[str, typer.Option(metavar="SIZE", help="Device tier budget (all layers), e.g. 64MiB.")] = "64MiB",
    host_budget: Annotated[str, typer.Option(metavar="SIZE", help="Host tier budget (all layers); beyond it the KV goes to disk.")] = "128MiB",
    disk_dir: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Disk tier directory (default: a temporary one, removed after).")] = None,
    size: Annotated[int, typer.Option(help="Shorter side of the decoded frames, pixels.")] = 224,
    ask_every: Annotated[float, typer.Option(help="Stream seconds between questions (0: none).")] = 60.0,
    kv_dtype: Annotated[str, typer.Option(help="KV storage type: auto, bfloat16 or float32.")] = "auto",
    out: Annotated[Path, typer.Option(help="Output directory: soak.json, soak.png, soak.md, and soak-progress.jsonl (every sample as it is taken: an interrupted run keeps them).")] = Path("bench-out/soak"),
) -> None:
    """Play a long real stream with bounded device and host tiers and log RSS and each tier's bytes every
    minute of stream time: RSS must stay flat (within 10%) once the budgets are full."""
    from vrex.bench.soak import SoakConfig
    from vrex.sizes import parse_bytes

    specs = [p.strip() for p in policies.split(";") if p.strip()]
    errors = [size_error("--device-budget", device_budget), size_error("--host-budget", host_budget),
              directory_error("--disk-dir", disk_dir), directory_error("--out", out)]
    errors.append(choice_error("--kv-dtype", kv_dtype, KV_DTYPES))
    if not specs:
        errors.append(f"--policies '{policies}': give at least one policy, e.g. 'full;resv'")
    errors += [policy_error(spec) for spec in specs]
    budgets = [1 if err else parse_bytes(text) for err, text in zip(errors[:2], (device_budget, host_budget))]
    configs = [SoakConfig(policy=spec, minutes=minutes, fps=fps, stride=stride, device_budget=budgets[0], host_budget=budgets[1],
                          disk_dir=None if disk_dir is None else str(disk_dir), size=size, ask_every=ask_every,
                          kv_dtype=None if kv_dtype == "auto" else kv_dtype) for spec in specs]
    errors += configs[0].check() if configs else []
    errors = [e.replace("--policy ", "--policies ", 1) for e in errors if e]
    if errors:
        for line in dict.fromkeys(errors):
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(2)

    from vrex.bench.soak import run_soak_isolated, table, write_outputs
    from vrex.kv.store import KVStoreDiskError

    import signal
    import sys

    # SIGTERM (kill, a scheduler's stop) as an exception, so the process pool's exit stops the run's child
    # too: before, a killed soak left its child playing the stream
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    make_directory("--out", out)
    progress = out / "soak-progress.jsonl"
    progress.write_text("")
    results = []
    try:
        for config in configs:  # each in its own process: a run must not start on the heap another freed
            log(f"soak: {config.policy}, {config.minutes:g} stream minutes at {config.fps:g} fps, every {config.stride}. "
                f"frame real (samples as they come: {progress})")
            results.append(run_soak_isolated(config, progress))
            write_outputs(results, out)  # each finished run survives an interrupted sweep
    except KVStoreDiskError as e:
        fail(str(e))
    text = table(results)
    (out / "soak.md").write_text(text + "\n")
    print(text)
    for res in results:
        v = res["verdict"]
        growth = "n/a" if v["growth"] is None else f"{100 * v['growth']:+.1f}%"
        log(f"{res['config']['policy']}: RSS growth after the budgets filled {growth} "
             f"({'flat' if v['flat'] else 'NOT flat' if v['flat'] is not None else v.get('note', '')})")
    log(f"wrote {out / 'soak.json'}, {out / 'soak.png'} and {out / 'soak.md'}")
