"""`vrex run` end to end on a real clip, as a user runs it (a subprocess), plus argument errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer

from vrex.cli import parse_question
from vrex.io import list_demo_clips


def test_parse_question_forms():
    assert parse_question("12.5:What is shown?") == (12.5, "What is shown?")
    assert parse_question("1:30:What happened: a cat?") == (90.0, "What happened: a cat?")
    with pytest.raises(typer.BadParameter, match="TIME:QUESTION"):
        parse_question("what is shown")


def _vrex(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vrex.cli", *args], capture_output=True, text=True, timeout=300)


def test_run_real_clip_with_question_json():
    clip = list_demo_clips().get("cockatoo")
    if clip is None:
        pytest.skip("cockatoo.mp4 not available")
    proc = _vrex("run", str(clip), "--ask", "2:What do you see?", "--max-frames", "8", "--theta", "0", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert lines[0]["kind"] == "start" and lines[0]["policy"] == "full"
    frames = [e for e in lines if e["kind"] == "frame"]
    answers = [e for e in lines if e["kind"] == "answer"]
    assert len(frames) == 8
    assert [round(f["t"], 1) for f in frames] == [0.5 * i for i in range(8)]
    assert all(f["stats"]["total_ms"] > 0 for f in frames)
    assert [f["stats"]["cached_tokens"] for f in frames] == sorted(f["stats"]["cached_tokens"] for f in frames)
    assert len(answers) == 1 and answers[0]["t"] == 2.0 and answers[0]["stats"]["answered_at"] >= 2.0
    assert answers[0]["text"]


def test_run_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope.mp4"
    proc = _vrex("run", str(missing), "--json")
    assert proc.returncode == 2
    assert str(missing) in proc.stderr


def test_run_negative_recent_window_is_refused():
    proc = _vrex("run", "webcam", "--recent-tokens", "-3")
    assert proc.returncode == 2
    assert "--recent-tokens" in proc.stderr and "-3" in proc.stderr
