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


@pytest.fixture
def clip_dir(tmp_path, video):
    """Two real clips of different codecs and sizes, named so that natural order is a then b."""
    import shutil

    folder = tmp_path / "clips"
    folder.mkdir()
    shutil.copy(video("realshort.mp4"), folder / "a_2.mp4")
    shutil.copy(video("big_buck_bunny_432_433.webm"), folder / "a_10.webm")
    return folder


def _frames(path, **kw):
    with open_source(path, fps=0, size=32, **kw) as src:
        return [(f.t, np.asarray(f.image)) for f in src], src


def test_folder_of_videos_plays_back_to_back(clip_dir):
    first, _ = _frames(clip_dir / "a_2.mp4")
    second, one = _frames(clip_dir / "a_10.webm")
    both, src = _frames(clip_dir)
    assert src.info.kind == "videos" and src.end_of_stream.status == "complete"
    assert len(both) == len(first) + len(second)
    shift = src.info.duration - one.info.duration  # the second file starts where the first one's declared length ends
    assert shift > first[-1][0]
    for (t, image), (t0, image0) in zip(both, first + [(t + shift, im) for t, im in second]):
        assert t == pytest.approx(t0, abs=1e-6) and np.array_equal(image, image0)
    later, _ = _frames(clip_dir, start=shift)  # a start past the first file skips it whole
    assert [t for t, _ in later] == pytest.approx([t + shift for t, _ in second])


def test_folder_of_videos_loops(clip_dir):
    with open_source(clip_dir, fps=2, size=32, loop=True, max_frames=30) as src:
        times = [f.t for f in src]
    assert len(times) == 30 and times[-1] > 2 * src.info.duration
    assert all(b > a for a, b in zip(times, times[1:]))


def test_folder_mixing_videos_and_images_is_refused(clip_dir, image_paths):
    import shutil

    shutil.copy(image_paths[0], clip_dir / f"still{image_paths[0].suffix}")
    with pytest.raises(VideoSourceError, match="both videos .* and images"):
        open_source(clip_dir)


def test_unplayable_file_in_a_folder_of_videos_is_named(clip_dir):
    (clip_dir / "notes.mp4").write_text("not a video\n")
    with pytest.raises(VideoSourceError, match="notes.mp4 in this folder is not a playable video"):
        open_source(clip_dir)
