"""The resampling rule and size arithmetic on plain numbers (no media needed)."""

from __future__ import annotations

import pytest

from vrex.io.resample import Resampler, scaled_size


def run(times, fps, start=0.0):
    r = Resampler(fps, start)
    return [t for t in times if r.accept(t)]


def test_grid_picks_first_frame_at_or_after_each_target():
    times = [i / 30 for i in range(91)]  # 3 s at 30 fps
    out = run(times, 2)
    assert len(out) == 7
    for k, t in enumerate(out):
        assert k * 0.5 - 1e-9 <= t < k * 0.5 + 1 / 30


def test_slower_source_is_not_padded():
    times = [i * 0.4 for i in range(10)]  # 2.5 fps source, 10 fps target
    assert run(times, 10) == times


def test_native_rate_keeps_every_frame():
    times = [0.0, 0.013, 0.05, 0.051, 0.2]
    assert run(times, None) == times
    assert run(times, 0) == times


def test_gap_resumes_on_grid_without_burst():
    times = [0.0, 0.1, 0.2, 5.05, 5.1, 5.2, 5.3, 5.4, 5.5, 5.6]
    assert run(times, 2) == [0.0, 5.05, 5.5]


def test_float_rounding_does_not_double_emit():
    # 0.49999999 is "0.5" after float conversion; 0.52 must not also count as the 0.5 frame.
    assert run([0.0, 0.49999999, 0.52, 1.0], 2) == [0.0, 0.49999999, 1.0]


def test_backwards_and_duplicate_times_are_rejected():
    r = Resampler(None)
    assert r.accept(1.0)
    assert r.is_backwards(1.0) and r.is_backwards(0.5)
    assert not r.accept(0.5)
    assert r.accept(1.1)


def test_start_offsets_the_grid():
    times = [i / 10 for i in range(40)]
    assert run(times, 1, start=1.25) == pytest.approx([1.3, 2.3, 3.3])


def test_negative_fps_rejected():
    with pytest.raises(ValueError):
        Resampler(-1)


@pytest.mark.parametrize(
    "w,h,size,expected",
    [(1280, 720, 90, (160, 90)), (720, 1280, 90, (90, 160)), (768, 576, 64, (85, 64)), (10, 10, 20, (20, 20))],
)
def test_scaled_size_keeps_aspect(w, h, size, expected):
    assert scaled_size(w, h, size) == expected
    assert scaled_size(w, h, None) == (w, h)
