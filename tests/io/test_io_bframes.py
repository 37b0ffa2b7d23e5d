"""B-frames: every encoded frame comes out once, in presentation order, with increasing times."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _bframe_clips import RATE, closest, make_clip

from vrex.io import open_source


@pytest.fixture(scope="module")
def bframe_clip(video, tmp_path_factory):
    """bframe_clip(packed) -> (path of an MPEG-4 AVI with B-frames, the source pictures it encodes)."""
    folder = tmp_path_factory.mktemp("bframes")
    made = {}

    def make(packed: bool):
        if packed not in made:
            path = folder / ("packed.avi" if packed else "plain.avi")
            made[packed] = path, make_clip(video("realshort.mp4"), path, packed)
        return made[packed]

    return make


def shown(frame) -> np.ndarray:
    return np.asarray(frame.image.convert("L"), np.float32)


@pytest.mark.parametrize("packed", [True, False], ids=["divx-packed", "plain"])
def test_every_encoded_frame_comes_out_in_presentation_order(bframe_clip, packed):
    path, originals = bframe_clip(packed)
    n = len(originals)
    with open_source(path, fps=None) as src:
        frames = list(src)
    # Before the fix the packed clip lost every third frame ("dropped a frame whose time ... does
    # not advance"): its PTS come out of FFmpeg as 1, 2, 3, 5, 4, 6, 8, 7, ...
    assert len(frames) == n == src.stats.decoded and src.stats.skipped_out_of_order == 0
    assert [f.t for f in frames] == pytest.approx([k / RATE for k in range(n)], abs=1e-9)
    assert all(b.t > a.t for a, b in zip(frames, frames[1:]))
    # The k-th frame shows the k-th source picture: times and pictures agree.
    assert [closest(shown(f), originals) for f in frames] == list(range(n))
    assert src.stats.records == [] and src.end_of_stream.status == "complete"


def test_packed_clip_at_2fps_keeps_the_grid(bframe_clip):
    path, originals = bframe_clip(True)
    with open_source(path, fps=2) as src:
        frames = list(src)
    last = (len(originals) - 1) / RATE
    # The first frame at or after each 0.5 s target (12.5 frame periods: frames 0, 13, 25).
    want = [math.ceil(k * 0.5 * RATE) / RATE for k in range(int(last * 2) + 1)]
    assert [f.t for f in frames] == pytest.approx(want, abs=1e-9)
    assert [closest(shown(f), originals) for f in frames] == [round(f.t * RATE) for f in frames]


def test_damaged_b_frame_clip_counts_what_the_decoder_flags(bframe_clip, tmp_path):
    path, originals = bframe_clip(True)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(7)
    # Scribble over the middle of the file (the header and index at either end stay intact).
    for at in rng.integers(len(data) * 3 // 10, len(data) * 6 // 10, size=12):
        data[at : at + 40] = rng.integers(0, 256, size=40, dtype=np.uint8).tobytes()
    damaged = tmp_path / "damaged.avi"
    damaged.write_bytes(bytes(data))
    seen = []
    with pytest.warns(Warning):
        with open_source(damaged, fps=None, on_warning=seen.append) as src:
            times = [f.t for f in src]
    assert src.stats.skipped_corrupt > 0  # the decoder said so, and it is counted
    assert all(b > a for a, b in zip(times, times[1:])) and src.stats.skipped_out_of_order == 0
    assert len(times) + src.stats.skipped_corrupt >= len(originals) - 6
    corrupt = [w for w in seen if w.kind == "corrupt"]
    assert sum(w.count for w in corrupt) == src.stats.counts["corrupt"] == src.stats.skipped_corrupt
