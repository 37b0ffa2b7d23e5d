"""Damaged inputs: zeroed blocks, truncated files, missing timestamps. The stream must go on."""

from __future__ import annotations

import math
import random
import warnings

import av
import pytest

from vrex.io import DecodeStats, VideoDecodeWarning, VideoSourceError, open_source
from vrex.io.datatypes import MAX_WARNINGS


def times(src) -> list[float]:
    return [f.t for f in src]


def test_zeroed_block_mid_h264_is_skipped_and_counted(video, copy_clip, meta):
    clean = video("cockatoo.mp4")
    damaged = copy_clip(clean, zero=(0.40, 0.45))
    with pytest.warns(VideoDecodeWarning, match="damaged_cockatoo.mp4"):
        with open_source(damaged, fps=2, size=16) as src:
            got = times(src)
    with open_source(clean, fps=2, size=16) as ref:
        want = times(ref)
    assert src.stats.skipped_corrupt > 0
    assert src.stats.warnings and all("damaged_cockatoo.mp4" in w for w in src.stats.warnings)
    # Frames before the damage are untouched; frames after it still come, on the same grid.
    assert got[:8] == want[:8]
    assert got[-1] == want[-1] == pytest.approx(meta(clean).expected_count(2) / 2 - 0.5)
    assert len(want) - 3 <= len(got) <= len(want)
    assert all(b > a for a, b in zip(got, got[1:]))
    assert src.stats.decoded + src.stats.skipped_corrupt >= meta(clean).frames - 20


def test_zeroed_block_in_webm_resyncs_and_warns_about_the_gap(video, copy_clip):
    damaged = copy_clip(video("big_buck_bunny_0_30.webm"), zero=(0.40, 0.45))
    with pytest.warns(VideoDecodeWarning, match="no frames between"):
        with open_source(damaged, fps=2, size=16) as src:
            got = times(src)
    assert got[-1] == pytest.approx(29.5, abs=0.1)  # it went on to the end
    assert 40 < len(got) < 60


def test_truncated_mp4_with_index_first_yields_what_it_can(video, copy_clip, meta):
    clean = video("timecode_16s.mp4")  # 'moov' index before the data: a cut file stays readable
    cut = copy_clip(clean, keep=0.6)
    with pytest.warns(VideoDecodeWarning, match="truncated"):
        with open_source(cut, fps=2, size=16) as src:
            got = times(src)
    declared = meta(clean).duration
    assert 0.4 * declared < got[-1] < 0.75 * declared
    assert len(got) == math.floor(got[-1] * 2 + 1e-6) + 1  # every 0.5 s slot up to the cut
    assert src.stats.ended_early and src.stats.decoded > 0


def test_truncated_avi_yields_frames_up_to_the_cut(video, copy_clip):
    cut = copy_clip(video("vtest_pedestrians.avi"), keep=0.6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VideoDecodeWarning)
        with open_source(cut, fps=2, size=16) as src:
            got = times(src)
    assert 40 < got[-1] < 55 and len(got) == math.floor(got[-1] * 2 + 1e-6) + 1
    assert src.stats.emitted == len(got)
    # The last, half-written frame is either rejected by the decoder (counted once) or concealed.
    assert src.stats.skipped_corrupt <= 1


def test_avi_cut_inside_its_first_frames_says_truncated(video, tmp_path):
    """Cut 5 KB in (a fuzz find), the AVI keeps one frame of 159 and FFmpeg re-counts its length to that
    frame, so the declared duration cannot show the loss: the RIFF header's length does."""
    clean = video("vtest_pedestrians.avi")
    cut = tmp_path / "cut.avi"
    cut.write_bytes(clean.read_bytes()[:5115])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VideoDecodeWarning)
        with open_source(cut, fps=0, size=16) as src:
            got = times(src)
    assert len(got) == 1
    assert src.end_of_stream.status == "truncated" and src.stats.counts.get("truncated") == 1
    with open_source(clean, fps=2, size=16) as whole:  # the whole file ends complete
        list(whole)
    assert whole.end_of_stream.status == "complete" and "truncated" not in whole.stats.counts


def test_mp4_whose_header_hides_most_frames_says_truncated(video, tmp_path):
    """One bit flipped in the movie header's timescale (a fuzz find): the edit list, in that timescale,
    shrinks to a millisecond and FFmpeg decodes 1 frame of 400, with a declared duration to match. The
    sample table still counts 400: the pass ends 'truncated', with a warning naming both counts."""
    clean = video("timecode_16s.mp4")
    data = bytearray(clean.read_bytes())
    assert data[56:64] == b"\0\0\0\0\0\0\x03\xe8"  # mvhd: modification time, then timescale 1000
    data[60] ^= 1
    damaged = tmp_path / "flipped.mp4"
    damaged.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VideoDecodeWarning)
        with open_source(damaged, fps=2, size=16) as src:
            got = times(src)
    assert len(got) == 1 and src.info.declared_frames == 400
    assert src.end_of_stream.status == "truncated" and "decoded 1 of the 400 frames" in src.end_of_stream.reason
    with open_source(clean, fps=2, size=16) as whole:  # the whole file ends complete
        assert len(times(whole)) == 32
    assert whole.end_of_stream.status == "complete" and not whole.stats.counts


def test_chaplin_frame_before_a_zeroed_block_keeps_its_pixels(video, tmp_path):
    """chaplin.mp4 (H.264 with B-frames) with 51946 bytes zeroed from byte 66774 (a fuzz find): the frames
    before the first damaged packet (pts 0.64 s; the earliest damaged presentation time is 0.56 s) must
    come out as in the clean clip. Past the dropped packets the decoder emits the 0.52 s frame after the
    1.76 s one; the timeline used to hand out the smallest timestamp in its window, so the 0.52 s picture
    went out at 1.76 s and the 1.76 s picture at 0.52 s. MP4 stores each frame's own time: it is kept."""
    clean = video("chaplin.mp4")
    data = bytearray(clean.read_bytes())
    data[66774:66774 + 51946] = bytes(51946)
    damaged = tmp_path / "zeroed.mp4"
    damaged.write_bytes(bytes(data))

    def before(path, fps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", VideoDecodeWarning)
            with open_source(path, fps=fps, size=8) as src:
                return [(f.t, f.image.tobytes()) for f in src if f.t < 0.56]

    for fps in (None, 2):  # every frame (0.00 ... 0.52 s), and the 2 fps grid (0.00, 0.52 s)
        want = before(clean, fps)
        assert want[-1][0] == pytest.approx(0.52)
        assert before(damaged, fps) == want, fps


def test_truncated_mp4_with_index_last_is_a_clear_error(video, copy_clip):
    cut = copy_clip(video("cockatoo.mp4"), keep=0.6)  # its 'moov' index was in the lost 40%
    with pytest.raises(VideoSourceError, match=r"damaged_cockatoo\.mp4: .*moov atom not found"):
        open_source(cut)


def test_input_with_no_decodable_frame_raises_after_trying(video, copy_clip):
    # timecode_16s.mp4 starts with its 2.5 kB index: keep that, zero everything after it.
    dead = copy_clip(video("timecode_16s.mp4"), zero=(0.002, 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VideoDecodeWarning)
        src = open_source(dead, size=16)
        with pytest.raises(VideoSourceError, match="no decodable video frames"):
            list(src)
    assert src.stats.skipped_corrupt > 100 and src.stats.decoded == 0


@pytest.fixture
def raw_h264(video, tmp_path):
    """realshort.mp4's H.264 remuxed to a raw Annex-B stream: no container, no timestamps."""
    out_path = tmp_path / "realshort.h264"
    with av.open(str(video("realshort.mp4"))) as inp, av.open(str(out_path), "w", format="h264") as out:
        stream = inp.streams.video[0]
        ostream = out.add_stream_from_template(stream)
        for packet in inp.demux(stream):
            if packet.dts is not None:
                packet.stream = ostream
                out.mux(packet)
    return out_path


def test_missing_timestamps_fall_back_to_counting(raw_h264):
    with pytest.warns(VideoDecodeWarning, match="without timestamps"):
        with open_source(raw_h264, fps=None, size=16) as src:
            native = times(src)
    rate = src.info.native_fps
    assert len(native) == 36 and rate
    assert native == pytest.approx([i / rate for i in range(36)])
    with pytest.warns(VideoDecodeWarning):
        with open_source(raw_h264, fps=2, size=16) as src:
            assert len(times(src)) == math.floor(35 / rate * 2 + 1e-6) + 1
    assert len(src.stats.warnings) == 1  # once per stream, not once per frame


def test_warning_flood_is_capped_per_kind_and_summarised():
    seen = []
    stats = DecodeStats("x.mp4", listener=seen.append)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(MAX_WARNINGS + 5):
            stats.warn("corrupt", f"event {i}", t=float(i))
        stats.warn("gap", "another kind is not hidden by the flood")
        stats.finish()
    assert len(stats.warnings) == MAX_WARNINGS + 1 and stats.suppressed_warnings == 5
    assert len(caught) == MAX_WARNINGS + 2  # one more says the rest of 'corrupt' are only counted
    assert seen == stats.records and seen[0].to_event() == {
        "kind": "warning", "warning": "corrupt", "count": 1, "total": 1, "reason": "event 0", "t": 0.0,
        "source": "x.mp4"}
    summary = seen[-1]
    assert (summary.kind, summary.count, summary.total) == ("corrupt", 5, MAX_WARNINGS + 5)
    # Every occurrence is accounted for by exactly one record's count.
    assert sum(r.count for r in seen if r.kind == "corrupt") == stats.counts["corrupt"] == MAX_WARNINGS + 5


@pytest.mark.parametrize(
    "name", ["cockatoo.mp4", "vtest_pedestrians.avi", "big_buck_bunny_0_30.webm", "timecode_16s.mp4"]
)
def test_random_byte_damage_never_escapes(video, copy_clip, name):
    """Scribble random bytes over 30 spots after the header: frames keep coming, nothing raises."""
    path = copy_clip(video(name))
    data = bytearray(path.read_bytes())
    rng = random.Random(1234)
    for _ in range(30):
        n = rng.randrange(1, 200)
        at = rng.randrange(len(data) // 10, len(data) - n)
        data[at : at + n] = rng.randbytes(n)
    path.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VideoDecodeWarning)
        with open_source(path, fps=2, size=8) as src:
            got = times(src)
    assert len(got) >= 10 and all(b > a for a, b in zip(got, got[1:]))
    assert src.stats.emitted == len(got) <= src.stats.decoded


def test_a_lost_first_frame_does_not_move_t0(video, tmp_path):
    """cockatoo.mp4 with its first video packet (the opening keyframe) zeroed: the frames up to the
    next keyframe are lost, and the ones that come keep their own times (t = 0 is the stream's
    declared start, not the first frame that decoded), as in the clean clip."""
    clean = video("cockatoo.mp4")
    with av.open(str(clean)) as c:
        first = next(p for p in c.demux(c.streams.video[0]) if p.size)
        pos, size = first.pos, first.size
    data = bytearray(clean.read_bytes())
    data[pos:pos + size] = bytes(size)
    damaged = tmp_path / "first_zeroed_cockatoo.mp4"
    damaged.write_bytes(bytes(data))
    with open_source(clean, fps=0, size=16) as ref:
        want = times(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VideoDecodeWarning)
        with open_source(damaged, fps=0, size=16) as src:
            got = times(src)
    assert 0 < len(got) < len(want)
    assert got[0] > 0  # the first frames were lost: the first that came is not at 0
    assert set(got) <= set(want)  # every frame at its own time
    assert got == want[len(want) - len(got):]
