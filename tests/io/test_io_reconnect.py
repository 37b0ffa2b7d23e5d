"""Network sources that drop or stall mid-stream come back (real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import io
import time
import warnings

import av
import pytest
from _faulty_http import Fault, FaultyServer, Route

from vrex.io import Reconnect, VideoDecodeWarning, open_source

CLIP = "timecode_16s.mp4"  # index first (streams over plain HTTP), key frames at 0 s and 10 s
FAST = dict(initial_delay=0.05, max_delay=0.2, read_timeout=0.5)


@pytest.fixture
def server():
    servers: list[FaultyServer] = []

    def make(ranges: bool = True) -> FaultyServer:
        servers.append(FaultyServer(ranges))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def play(uri, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VideoDecodeWarning)
        start = time.monotonic()
        with open_source(uri, fps=2, size=16, **kw) as src:
            times = [f.t for f in src]
    return times, src, time.monotonic() - start


@pytest.fixture(scope="module")
def local_times(video):
    times, _, _ = play(video(CLIP))
    return times


def test_connection_closed_mid_file_resumes_by_seeking(server, video, local_times):
    data = video(CLIP).read_bytes()
    srv = server(ranges=True)
    route = Route([data], Fault("close", int(len(data) * 0.85)))  # past the key frame at 10 s
    seen = []
    times, src, elapsed = play(srv.add("/clip.mp4", route), reconnect=Reconnect(**FAST), on_warning=seen.append)
    assert times == local_times  # nothing lost, nothing repeated
    assert [w.kind for w in seen] == ["reconnect"] and "Input/output error" in seen[0].reason
    assert 10 < seen[0].t < times[-1]
    # The resumed request starts past the beginning: the source seeked to where it stopped.
    assert any(r and r != "bytes=0-" for r in route.requests[1:]), route.requests
    assert src.end_of_stream.status == "complete" and elapsed < 10


def test_stall_without_range_support_resumes_by_skipping(server, video, local_times):
    data = video(CLIP).read_bytes()
    srv = server(ranges=False)
    route = Route([data], Fault("stall", int(len(data) * 0.4)))
    times, src, elapsed = play(srv.add("/clip.mp4", route), reconnect=Reconnect(**FAST))
    assert times == local_times
    (record,) = src.stats.records
    assert record.kind == "reconnect" and "no data for 0.5 s (stalled)" in record.reason
    assert len(route.requests) >= 2 and src.end_of_stream.status == "complete"
    assert 0.5 < elapsed < 10  # the stall cost one read timeout, not the server's 30 s


def _mpegts(path, shift: float) -> bytes:
    """The clip remuxed to MPEG-TS (what live HTTP/UDP streams carry), timestamps moved by ``shift`` s."""
    out_buf = io.BytesIO()
    with av.open(str(path)) as inp, av.open(out_buf, "w", format="mpegts") as out:
        stream = inp.streams.video[0]
        ostream = out.add_stream_from_template(stream)
        offset = int(shift / stream.time_base)
        for packet in inp.demux(stream):
            if packet.dts is None:
                continue
            packet.pts += offset
            packet.dts += offset
            packet.stream = ostream
            out.mux(packet)
    return out_buf.getvalue()


def test_live_stream_reopens_and_its_time_goes_on(server, video, local_times):
    before, after = _mpegts(video(CLIP), 0.0), _mpegts(video(CLIP), 100.0)
    srv = server(ranges=False)
    # No Content-Length: a live stream. It stalls at 40%; re-opened, it is "100 s later".
    route = Route([before, after], Fault("stall", int(len(before) * 0.4)), length=False)
    times, src, elapsed = play(srv.add("/live.ts", route), reconnect=Reconnect(**FAST))
    assert all(b > a for a, b in zip(times, times[1:]))
    stalled = src.stats.records[0]  # at the last frame decoded before the stall
    split = next(i for i, t in enumerate(times) if t > stalled.t)
    assert times[:split] == local_times[:split]
    # The wall-clock time lost (at least the read timeout) is kept; then the re-opened stream
    # plays whole (its 16 s, from its own start) on the same 0.5 s grid.
    assert times[split] >= stalled.t + 0.5
    after = times[split:]
    assert after[-1] - after[0] == pytest.approx(local_times[-1], abs=0.5)
    assert abs(len(after) - len(local_times)) <= 1
    # The second body ends without a length (an I/O error in FFmpeg); re-opening replays that same
    # body from its start, which marks the end of a finite stream rather than a drop.
    assert [w.kind for w in src.stats.records] == ["reconnect", "reconnect"] and len(route.requests) == 3
    assert src.end_of_stream.status == "complete" and elapsed < 10


def test_gives_up_after_the_attempts_with_a_clear_end(server, video):
    data = video(CLIP).read_bytes()
    srv = server()
    route = Route([data, b""], Fault("close", len(data) // 2))  # gone for good: 404 on re-open
    times, src, elapsed = play(srv.add("/clip.mp4", route), reconnect=Reconnect(attempts=2, **FAST))
    assert 3 < times[-1] < 12 and src.stats.lost  # the frames before the drop were all given
    kinds = [w.kind for w in src.stats.records]
    assert kinds == ["reconnect", "reconnect", "lost"]  # the drop, a failed re-open, the last one failed
    assert "404" in src.stats.records[-1].reason
    end = src.end_of_stream
    assert (end.status, end.t, end.frames) == ("lost", times[-1], len(times))
    assert end.to_event()["warnings"] == {"reconnect": 2, "lost": 1}
    assert elapsed < 10


def test_no_reconnect_ends_at_the_first_drop(server, video):
    data = video(CLIP).read_bytes()
    srv = server()
    route = Route([data], Fault("close", len(data) // 2))
    times, src, _ = play(srv.add("/clip.mp4", route), reconnect=Reconnect(attempts=0))
    assert times and src.end_of_stream.status == "lost" and len(route.requests) == 1


def test_reconnect_settings():
    policy = Reconnect(attempts=4, initial_delay=0.5, max_delay=1.5)
    assert [policy.delay(k) for k in (1, 2, 3, 4)] == [0.5, 1.0, 1.5, 1.5]
    for bad in (dict(attempts=-1), dict(initial_delay=2.0, max_delay=1.0), dict(read_timeout=0)):
        with pytest.raises(ValueError):
            Reconnect(**bad)
