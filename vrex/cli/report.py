"""``vrex report``: summarise ``vrex run --json`` logs minute by minute (the work is in ``vrex.bench.runlog``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from vrex.cli.options import directory_error, fail, make_directory, number_error


def report(
    logs: Annotated[list[Path], typer.Argument(metavar="LOG...", help="Logs written by `vrex run ... --json > LOG`; several are shown side by side.")],
    names: Annotated[Optional[str], typer.Option(help="Names of the runs, ';'-separated, one per LOG (default: each run's policy).")] = None,
    deadline_ms: Annotated[float, typer.Option(help="Per-frame deadline in milliseconds, counted in 'over deadline' (the default: at 2 fps a frame is done before the next arrives).")] = 500.0,
    every: Annotated[int, typer.Option(help="Print every EVERY-th minute's row (and the last); the JSON keeps them all.")] = 1,
    out: Annotated[Optional[Path], typer.Option(help="Write report.json, report.md and report.png (latency and RSS per minute) here.")] = None,
) -> None:
    """Does a long run keep up, is its memory bounded, what did it answer: per-frame p50/p99/max,
    frames over a deadline, the busy share of each stream minute (frames + narrations + answers,
    compute seconds per stream minute: below 1 is real time) and RSS and each KV tier's MiB per minute.

    Example: `vrex run ../shared/assets/videos --loop --max-frames 7200 --policy resv --json > resv.jsonl`,
    the same with `--policy full > full.jsonl`, then `vrex report resv.jsonl full.jsonl --out report/`."""
    from vrex.bench.runlog import RunLogError, plot, read_events, summarize, table

    run_names = [n.strip() for n in names.split(";")] if names else [None] * len(logs)
    errors = [number_error("--deadline-ms", deadline_ms, lo=0, meaning="milliseconds"),
              number_error("--every", every, lo=1, meaning="minutes"), directory_error("--out", out)]
    if len(run_names) != len(logs):
        errors.append(f"--names '{names}': {len(run_names)} names for {len(logs)} logs; give one per LOG")
    errors = [e for e in errors if e]
    if errors:
        for line in errors:
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(2)
    try:
        summaries = [summarize(read_events(p), deadline_ms=deadline_ms, name=n) for p, n in zip(logs, run_names)]
    except RunLogError as e:
        fail(str(e))
    text = table(summaries, every=every)
    print(text)
    for s in summaries:
        for a in s["answers"]:
            print(f"{s['name']} at {a['t']:.0f} s: {a['question']!r} -> {a['text']!r}")
    if out is not None:
        make_directory("--out", out)
        (out / "report.json").write_text(json.dumps(summaries, indent=1) + "\n")
        (out / "report.md").write_text(text + "\n")
        plot(summaries, out / "report.png")
        typer.echo(f"wrote {out / 'report.json'}, {out / 'report.md'} and {out / 'report.png'}", err=True)
