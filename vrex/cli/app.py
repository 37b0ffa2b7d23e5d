"""The root ``vrex`` command: the top-level commands and the command groups, each group in its own module.

| command                                           | module                                          |
|---------------------------------------------------|-------------------------------------------------|
| ``vrex run``                                      | ``vrex/cli/run.py`` (``--session``, signals: ``durable.py``) |
| ``vrex setup``, ``vrex policies``                 | ``vrex/cli/setup.py``                           |
| ``vrex report``                                   | ``vrex/cli/report.py``                          |
| ``vrex serve``                                    | ``vrex/cli/serve.py``                           |
| ``vrex bench stream|streams|engine|kv|serve|peer``| ``vrex/cli/bench.py``                           |
| ``vrex bench soak``                               | ``vrex/cli/soak.py``                            |
| ``vrex train``                                    | ``vrex/cli/train.py``                           |
| ``vrex eval live|plot|tags``                      | ``vrex/cli/eval.py``                            |
| ``vrex hw check|simulate|figure|systems|fit``     | ``vrex/cli/hw.py``                              |

Option checks shared by commands, ``fail`` and the benchmarks' progress ``log`` live in ``vrex/cli/options.py``.
"""

from __future__ import annotations

import importlib
import os

import click
import typer
from typer.core import TyperGroup

from vrex.cli.options import fail
from vrex.cli.report import report
from vrex.cli.run import run
from vrex.cli.serve import serve
from vrex.cli.setup import policies, setup
from vrex.engine.heap import ENV as MMAP_ENV
from vrex.engine.heap import mmap_threshold_error


class _Commands(TyperGroup):
    """The root group. The command groups are imported when used (or listed by --help), not at
    start-up: `vrex run` checks its options before torch is imported. Nothing is caught here: an
    import error in a group is a traceback, never a vanished command."""

    lazy = {"bench": "vrex.cli.bench", "train": "vrex.cli.train", "eval": "vrex.cli.eval", "hw": "vrex.cli.hw"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), *self.lazy]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy:
            return super().get_command(ctx, name)
        group = typer.main.get_group(importlib.import_module(self.lazy[name]).app)
        group.name = name
        return group


app = typer.Typer(
    cls=_Commands,
    help="vrex: a streaming video LLM with bounded memory (VideoLLM-online's LIVE loop + V-Rex's ReSV KV retrieval).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _environment() -> None:
    # Runs before every command: the environment variables vrex reads are checked like its options,
    # before anything loads (one error line, exit 2), not when a session starts after the model.
    error = mmap_threshold_error(os.environ.get(MMAP_ENV))
    if error:
        fail(error)


app.command()(setup)
app.command()(run)
app.command()(policies)
app.command()(serve)
app.command()(report)
