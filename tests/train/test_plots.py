"""`vrex eval plot`: needle rows of several evaluation files in one figure; bad files named."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from vrex.cli import app
from vrex.train.plots import needle_series

ROWS = [
    {"model": "trained", "policy": "full", "metric": "needle_acc@5min", "value": 0.25},
    {"model": "trained", "policy": "full", "metric": "needle_acc@1min", "value": 0.5},
    {"model": "trained", "policy": "full", "metric": "needle_narrations@1min", "value": 2.0},
    {"model": "trained", "policy": "full", "metric": "needle_acc_silent@1min", "value": 0.125},
    {"model": "trained", "policy": "resv+recent22", "metric": "needle_acc_silent@2.5min_seen_needle", "value": 0.75},
    {"model": "untrained", "policy": "full", "metric": "needle_acc@1min", "value": 0.0},
    {"model": "trained", "policy": "full", "metric": "qa_acc", "value": 0.5},
]


def test_needle_series_groups_and_sorts():
    s = needle_series(ROWS)
    assert s == {
        ("trained", "full", "live", "held-out"): [(1.0, 0.5), (5.0, 0.25)],
        ("trained", "full", "silent", "held-out"): [(1.0, 0.125)],
        ("trained", "resv+recent22", "silent", "seen"): [(2.5, 0.75)],
        ("untrained", "full", "live", "held-out"): [(1.0, 0.0)],
    }


def _text(result) -> str:
    return " ".join(result.output.replace("│", " ").split())


def test_plot_command_writes_png_and_names_bad_input(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(ROWS))
    b.write_text(json.dumps({"rows": ROWS[:3]}))  # a results file with a "rows" key
    out = tmp_path / "fig.png"
    ok = CliRunner().invoke(app, ["eval", "plot", str(a), str(b), "--label", "default", "--label", "long", "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"metric": "x"}]))
    noneedle = tmp_path / "qa.json"
    noneedle.write_text(json.dumps(ROWS[-1:]))
    for args, why in [
        ([str(tmp_path / "missing.json")], "is not a file"),
        ([str(bad)], "holds no rows"),
        ([str(noneedle)], "no needle_acc rows"),
        ([str(a), str(b), "--label", "one"], "1 labels for 2 files"),
    ]:
        result = CliRunner().invoke(app, ["eval", "plot", *args, "--out", str(tmp_path / "x.png")])
        assert result.exit_code == 2 and why in _text(result), (args, result.output)
