"""`vrex run --json` on a damaged clip, as a user runs it (issue 18, item 5): the decode damage the
media fuzzer (tests/io/test_fuzz_media.py) explores, end to end through the real model. No traceback, the
frames before the damage are the clean clip's, every warning is an event and the end of the source says
how many of each kind there were."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import warnings

import pytest

from vrex.io import VideoDecodeWarning, list_demo_clips, open_source


def test_vrex_run_json_on_a_damaged_clip_keeps_events_and_counts_damage(tmp_path):
    clip = list_demo_clips().get("timecode_16s")  # its index comes first: damage mid-file leaves it readable
    if clip is None:
        pytest.skip("timecode_16s.mp4 not available (run `make setup`)")
    data = bytearray(clip.read_bytes())
    rng = random.Random(18)
    start = len(data) // 2
    for _ in range(60):  # 60 random bytes flipped in the second half of the file
        data[rng.randrange(start, len(data))] ^= rng.randrange(1, 256)
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VideoDecodeWarning)
        with open_source(clip, fps=2) as src:
            clean_times = [f.t for f in src]

    proc = subprocess.run([sys.executable, "-m", "vrex", "run", str(damaged), "--json", "--theta", "0", "--fps", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    frames = [e["t"] for e in events if e["kind"] == "frame"]
    warns = [e for e in events if e["kind"] == "warning"]
    (end,) = [e for e in events if e["kind"] == "source_end"]
    before = [t for t in clean_times if t < 7.0]  # the damage starts at half the bytes: about 8 s in
    assert frames[:len(before)] == pytest.approx(before)
    assert end["frames"] == len(frames) and end["status"] in ("complete", "truncated")
    assert warns, "60 flipped bytes in H.264 data must be reported"
    for kind, total in end["warnings"].items():
        assert sum(w["count"] for w in warns if w["warning"] == kind) == total
