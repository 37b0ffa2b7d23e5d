"""SIGINT and SIGTERM stop ``vrex run`` cleanly (real signals to a real subprocess): events already
produced kept, trace and session flushed, a summary line, temporary vrex-kv-* directories removed;
a stopped --session run resumes with the same command."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from test_durable_cli import ROOT, env, groups, parse, run_args, run_vrex, vrex_cmd


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(vrex_cmd(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)


def _signal_after_frames(p: subprocess.Popen, sig: int, frames: int) -> tuple[list[str], str]:
    """Send ``sig`` once ``frames`` frame events were printed; return every stdout line and stderr."""
    lines, seen = [], 0
    for line in p.stdout:
        lines.append(line)
        if json.loads(line).get("kind") == "frame":
            seen += 1
            if seen == frames:
                p.send_signal(sig)
                break
    out, err = p.communicate(timeout=300)
    return lines + out.splitlines(keepends=True), err


def _tier_args(tiers) -> list[str]:
    return ["--disk-dir", str(tiers), "--device-budget", "1MB", "--host-budget", "1MB"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[list[tuple]]:
    """The uninterrupted run with the same settings, once for both signals (a whole `vrex run`)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    rc, full, err = run_vrex(run_args(*_tier_args(tmp / "tiers"), "--session", str(tmp / "ref")))
    assert rc == 0, err
    return groups(full)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_cleanly_and_the_session_resumes(uninterrupted, tmp_path, sig):
    tiers, d, trace = tmp_path / "tiers", tmp_path / "session", tmp_path / "trace.jsonl"
    tier_args = _tier_args(tiers)
    extra = ["--session", str(d), "--trace", str(trace), *tier_args]
    p = _start(run_args(*extra))
    lines, err = _signal_after_frames(p, sig, 2)
    assert p.returncode == 128 + sig, err[-800:]
    events = parse("".join(lines))
    assert len(events) == len(lines)  # every line a whole JSON object: nothing cut
    stopped = events[-1]
    assert stopped["kind"] == "stopped" and stopped["signal"] == signal.Signals(sig).name
    assert stopped["saved_frames"] == stopped["frames"] >= 2
    assert f"stopped by {signal.Signals(sig).name} after {stopped['frames']} frames" in err and "Traceback" not in err
    assert not list(tiers.glob("vrex-kv-*"))  # the temporary disk tier is gone
    steps = [json.loads(line) for line in trace.read_text().splitlines()]  # flushed: whole lines only
    assert len(steps) >= 3  # prefix, frames, decode steps
    # resume: the same command continues where the stop left off
    rc, resumed, err = run_vrex(run_args(*extra))
    assert rc == 0, err
    resume = [e for e in resumed if e["kind"] == "resume"][0]
    assert resume["frame"] == stopped["frames"]
    ref = uninterrupted
    assert groups(events) == ref[: stopped["frames"]] and groups(resumed) == ref[stopped["frames"]:]


def test_sigterm_without_a_session_keeps_events_and_removes_tiers(tmp_path):
    tiers = tmp_path / "tiers"
    p = _start(run_args("--disk-dir", str(tiers), "--device-budget", "1MB", "--host-budget", "1MB"))
    lines, err = _signal_after_frames(p, signal.SIGTERM, 1)
    assert p.returncode == 128 + signal.SIGTERM, err[-800:]
    events = parse("".join(lines))
    assert [e["kind"] for e in events][:2] == ["start", "frame"] and events[-1]["kind"] == "stopped"
    assert events[-1]["session"] is None and "stopped by SIGTERM" in err
    assert not list(tiers.glob("vrex-kv-*"))
