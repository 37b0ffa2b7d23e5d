"""``loop``: a file or an image folder played again and again on one clock (a long stream from short
clips, as `vrex run --loop` and the hour-long runs use it)."""

from __future__ import annotations

import numpy as np
import pytest

from vrex.io import VideoSourceError, open_source


def test_looped_clip_repeats_its_frames_on_one_clock(video):
    path = video("realshort.mp4")
    with open_source(path, fps=0, size=48) as src:
        one = [(f.t, np.asarray(f.image)) for f in src]
    n = len(one)
    with open_source(path, fps=0, size=48, loop=True, max_frames=2 * n + 3) as src:
        looped = [(f.t, np.asarray(f.image)) for f in src]
    assert len(looped) == 2 * n + 3 and src.end_of_stream.status == "stopped"
    times = [t for t, _ in looped]
    assert all(b > a for a, b in zip(times, times[1:]))  # the clock never goes back at a pass boundary
    period = times[n] - times[n - 1]
    assert period == pytest.approx(one[1][0] - one[0][0], abs=1e-3)  # one frame period between passes
    for i in range(n + 3):  # the second and third passes are the first one again, shifted in time
        t, image = looped[n + i]
        assert np.array_equal(image, one[i % n][1])
        assert t == pytest.approx(one[i % n][0] + (i // n + 1) * (one[-1][0] + period), abs=1e-6)


def test_looped_clip_resampled_keeps_the_rate(video):
    with open_source(video("realshort.mp4"), fps=2, size=48, loop=True, max_frames=60) as src:
        times = [f.t for f in src]
    assert len(times) == 60 and times[-1] > 3 * src.info.duration  # more than three passes
    assert max(np.diff(times)) < 0.5 + 0.1  # no gap at the boundaries


def test_looped_folder(photo_dir):
    with open_source(photo_dir, fps=1, loop=True, max_frames=10) as src:
        times = [f.t for f in src]
    assert times == pytest.approx([float(i) for i in range(10)])  # 4 photos, 1 s each, again and again


def test_live_inputs_cannot_loop():
    with pytest.raises(VideoSourceError, match="cannot loop a url input"):
        open_source("rtsp://127.0.0.1:9/none", loop=True)
