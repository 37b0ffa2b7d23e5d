"""Warnings as data and how a pass ended, for consumers that only read JSON."""

from __future__ import annotations

import json
import warnings

import pytest

from vrex.io import SourceWarning, VideoDecodeWarning, VideoSourceError, open_source


def play(path, **kw):
    seen: list[SourceWarning] = []
    with warnings.catch_warnings(record=True) as stderr:
        warnings.simplefilter("always")
        with open_source(path, size=16, on_warning=seen.append, **kw) as src:
            times = [f.t for f in src]
    printed = [str(w.message) for w in stderr if issubclass(w.category, VideoDecodeWarning)]
    return times, src, seen, printed


def test_truncated_file_reports_a_record_and_a_truncated_end(video, copy_clip):
    cut = copy_clip(video("timecode_16s.mp4"), keep=0.6)
    times, src, seen, printed = play(cut, fps=2)
    (record,) = seen
    assert record.kind == "truncated" and "truncated" in record.reason
    assert times[-1] <= record.t < times[-1] + 0.5  # the last frame decoded; the last emitted is on the grid
    assert printed == [str(record)] == src.stats.warnings  # what stderr says, the data says too
    end = src.end_of_stream
    assert (end.status, end.t, end.frames, end.warnings) == ("truncated", times[-1], len(times), {"truncated": 1})
    event = json.loads(json.dumps(end.to_event()))
    assert event["kind"] == "source_end" and event["status"] == "truncated" and event["source"] == str(cut)
    warning = json.loads(json.dumps(record.to_event()))
    assert warning["kind"] == "warning" and warning["warning"] == "truncated" and warning["count"] == 1


def test_damage_mid_stream_gives_one_record_per_stderr_line(video, copy_clip):
    damaged = copy_clip(video("big_buck_bunny_0_30.webm"), zero=(0.40, 0.45))
    times, src, seen, printed = play(damaged, fps=2)
    assert printed == [str(r) for r in seen] and seen == src.stats.records
    gap = next(r for r in seen if r.kind == "gap")
    assert gap.t in times or gap.t > times[0]  # the time where frames came back
    assert src.end_of_stream.status == "complete" and src.end_of_stream.warnings == src.stats.counts


def test_clean_clip_ends_complete_without_records(video):
    times, src, seen, printed = play(video("cockatoo.mp4"), fps=2)
    assert seen == printed == [] and src.end_of_stream.status == "complete"
    assert src.end_of_stream.frames == len(times) and src.end_of_stream.t == times[-1]


@pytest.mark.parametrize(
    "kw,reason", [({"max_frames": 3}, "max_frames=3 reached"), ({"end": 2.0}, "end time 2 s reached")]
)
def test_windows_end_as_stopped(video, kw, reason):
    _, src, _, _ = play(video("cockatoo.mp4"), fps=2, **kw)
    assert (src.end_of_stream.status, src.end_of_stream.reason) == ("stopped", reason)


def test_consumer_that_stops_early_gets_a_stopped_end(video):
    src = open_source(video("cockatoo.mp4"), fps=2, size=16)
    for frame in src:
        if frame.index == 2:
            break
    assert src.end_of_stream is None  # the pass is still open...
    src.close()
    end = src.end_of_stream  # ...closing the source ends it
    assert (end.status, end.frames, end.t) == ("stopped", 3, 1.0)
    # Iterating again starts a new pass with a fresh status.
    assert len(list(src)) == 28 and src.end_of_stream.status == "complete"


def test_failed_pass_says_why(video, copy_clip):
    dead = copy_clip(video("timecode_16s.mp4"), zero=(0.002, 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VideoDecodeWarning)
        src = open_source(dead, size=16)
        with pytest.raises(VideoSourceError) as err:
            list(src)
    end = src.end_of_stream
    assert end.status == "failed" and end.reason == str(err.value) and end.frames == 0 and end.t is None
    assert end.warnings["corrupt"] == src.stats.skipped_corrupt > 100
