"""Crash tests that kill for real: ``vrex run --session`` as a subprocess on a real clip, killed with
SIGKILL at chosen points (``VREX_CRASH_AT``, vrex.engine.persist.crash_point: the process kills
itself there, nothing is mocked), resumed with the same command; the JSON events after the resume
point must equal an uninterrupted run's. A full disk during a save (a tmpfs mounted in a user
namespace) must give a clear error, and the session must resume from the last good frame."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vrex.io import assets_dir

ROOT = Path(__file__).resolve().parents[2]


def _clip() -> str:
    root = assets_dir()
    if root is None:
        pytest.fail("shared test media not found (set VREX_ASSETS)") if os.environ.get("CI") else pytest.skip("no shared media")
    return str(Path(root) / "videos" / "cockatoo.mp4")


def run_args(*extra: str) -> list[str]:
    """5 frames at 1 fps of a real clip, ReSV, a narration at the first frame, a question at 2 s and
    one past the end (answered at the end of the stream)."""
    return [_clip(), "--fps", "1", "--max-frames", "5", "--policy", "resv", "--ask", "2:What do you see?",
            "--ask", "9:What was shown before?", "--json", *extra]


def vrex_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "vrex", "run", *args]


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "VREX_CRASH_AT"}
    # One intra-op thread, as the suite's own processes (tests/conftest.py): with 2 threads, a vrex run
    # beside the other pytest worker took 41.5 s instead of 8 s (OpenMP threads waiting on a busy core);
    # alone, 1 thread is no slower here (8.0 s against 8.7 s for the 5-frame run).
    e.update(OMP_NUM_THREADS="1", **extra)
    return e


def run_vrex(args: list[str], **env_extra: str) -> tuple[int, list[dict], str]:
    p = subprocess.run(vrex_cmd(args), capture_output=True, text=True, env=env(**env_extra), cwd=ROOT, timeout=600)
    return p.returncode, parse(p.stdout), p.stderr


def parse(stdout: str) -> list[dict]:
    """Complete JSON lines (a kill can cut the last one)."""
    out = []
    for line in stdout.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def key(e: dict) -> tuple:
    """What must be identical (timings and RSS excepted)."""
    s = e.get("stats", {})
    return (e["t"], e["kind"], e["text"], s.get("cached_tokens"), s.get("p_interval"), s.get("kv_bytes"),
            s.get("selected_ratio"), s.get("question"))


def groups(events: list[dict]) -> list[list[tuple]]:
    """Stream events per frame: the frame event and what followed it (answers at the stream's end
    join the last frame)."""
    out: list[list[tuple]] = []
    for e in events:
        if e.get("kind") == "frame":
            out.append([key(e)])
        elif e.get("kind") in ("response", "answer") and out:
            out[-1].append(key(e))
    return out


@pytest.fixture(scope="module")
def reference() -> list[list[tuple]]:
    rc, events, err = run_vrex(run_args())
    assert rc == 0, err
    g = groups(events)
    assert len(g) == 5 and any(k[1] == "response" for grp in g for k in grp) and sum(k[1] == "answer" for grp in g for k in grp) == 2
    return g


def resume_and_compare(reference, d: Path, printed: list[list[tuple]], *extra: str) -> dict:
    """Resume with the same command: a `resume` event at the last durable frame, then exactly the
    uninterrupted run's events from there on."""
    rc, events, err = run_vrex(run_args("--session", str(d), *extra))
    assert rc == 0, err
    resume = [e for e in events if e.get("kind") == "resume"]
    assert len(resume) == 1, events[:3]
    n = resume[0]["frame"]
    # durable = every frame whose events were printed, or one less (killed between print and save)
    complete = len(printed) if printed and printed[-1] == reference[len(printed) - 1] else max(len(printed) - 1, 0)
    assert max(complete - 1, 0) <= n <= complete, (n, complete)
    if n:
        assert resume[0]["t"] == reference[n - 1][0][0]
    assert groups(events) == reference[n:]
    return resume[0]


@pytest.mark.parametrize("point", [
    "prefill:4",       # before the 4th frame's prefill step
    "store_block:250", # in the middle of a step's layers (frame 1's prefill, layer 10 of 30: 30 per step, before
                       # it the prompt, frame 0, its narration's prompt and 5 decoded tokens)
    "decode:9",        # while answering the question at 2 s (the first narration takes 6 tokens)
    "save:3",          # half of the 3rd frame's log record written
    "manifest:2",      # the 2nd frame's record durable, its manifest not yet
])
def test_kill_9_then_resume_gives_the_uninterrupted_events(reference, tmp_path, point):
    d = tmp_path / "session"
    rc, events, err = run_vrex(run_args("--session", str(d)), VREX_CRASH_AT=point)
    assert rc == -9, (rc, err[-500:])
    printed = groups(events)
    assert printed[:-1] == reference[: max(len(printed) - 1, 0)]  # what was printed before the kill was right
    resume_and_compare(reference, d, printed)


def test_resuming_a_finished_session_prints_nothing_new(reference, tmp_path):
    d = tmp_path / "session"
    rc, events, err = run_vrex(run_args("--session", str(d)))
    assert rc == 0 and groups(events) == reference, err
    rc, events, err = run_vrex(run_args("--session", str(d)))
    assert rc == 0, err
    assert [e["kind"] for e in events] == ["start", "resume", "source_end"]
    assert events[1]["frame"] == 5


def test_other_settings_or_damage_exit_2_naming_what(tmp_path):
    d = tmp_path / "session"
    rc, _, err = run_vrex(run_args("--session", str(d)), VREX_CRASH_AT="prefill:2")
    assert rc == -9
    args = run_args("--session", str(d))
    args[args.index("--policy") + 1] = "resv[ratio=0.2]"
    rc, _, err = run_vrex(args)
    assert rc == 2 and "policy.params.ratio: saved 0.3, given 0.2" in err, err
    args = run_args("--session", str(d))
    args[args.index("--fps") + 1] = "2"
    rc, _, err = run_vrex(args)
    assert rc == 2 and "run.fps: saved 1.0, given 2.0" in err and "Traceback" not in err, err
    log = d / "log.bin"
    data = bytearray(log.read_bytes())
    data[40] ^= 0xFF
    log.write_bytes(bytes(data))
    rc, _, err = run_vrex(run_args("--session", str(d)))
    assert rc == 2 and "fails its checksum" in err and "Traceback" not in err, err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    rc, _, err = run_vrex(run_args("--session", str(tmp_path / "junk")))
    assert rc == 2 and "holds no vrex session" in err, err


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    p = subprocess.run(["unshare", "-Urm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d"],
                       capture_output=True)
    return p.returncode == 0


def test_full_disk_during_a_save_then_resume_from_the_last_good_frame(reference, tmp_path):
    """A 6 MB tmpfs (user + mount namespace): the checkpoint (~3.3 MB) and the first frames fit, a
    later frame's save hits ENOSPC: one clear error line, exit 2; with room again (remounted larger)
    the same command resumes from the last good frame and gives the uninterrupted events."""
    if not _can_mount_tmpfs():
        pytest.skip("cannot mount a tmpfs in a user namespace here; test_durable.py's ENOSPC test covers the API")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = " ".join(map(_quote, vrex_cmd(run_args("--session", str(mnt / "s")))))
    script = (f"mount -t tmpfs -o size=6m tmpfs {mnt} && {cmd} > {tmp_path}/out1 2> {tmp_path}/err1; echo $? > {tmp_path}/rc1; "
              f"mount -o remount,size=64m {mnt} && {cmd} > {tmp_path}/out2 2> {tmp_path}/err2; echo $? > {tmp_path}/rc2")
    subprocess.run(["unshare", "-Urm", "sh", "-c", script], env=env(), cwd=ROOT, timeout=900, check=True)
    err1 = (tmp_path / "err1").read_text()
    assert (tmp_path / "rc1").read_text().strip() == "2", err1
    assert "disk full" in err1 and str(mnt / "s") in err1 and "Traceback" not in err1, err1
    printed = groups(parse((tmp_path / "out1").read_text()))
    assert 1 <= len(printed) < 5 and printed == reference[: len(printed)]
    rc2, err2 = (tmp_path / "rc2").read_text().strip(), (tmp_path / "err2").read_text()
    assert rc2 == "0", err2
    events = parse((tmp_path / "out2").read_text())
    resume = [e for e in events if e.get("kind") == "resume"][0]
    assert resume["frame"] == len(printed) - 1  # the frame whose save failed is redone
    assert groups(events) == reference[resume["frame"]:]


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)
