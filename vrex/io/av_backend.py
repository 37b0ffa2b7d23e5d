"""Decode one video stream with PyAV: files, network streams and capture devices.

Only the chosen video stream is demuxed; audio and other streams are never decoded, so a broken
audio track cannot stop the video. Frame times come from :class:`Timeline` (frames, or in AVI their
timestamps, put back in presentation order); network sources reconnect per :class:`Reconnect`;
frames over the pixel limit are refused from the stream header, before any decoding.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from fractions import Fraction

import av
from PIL import Image

from .av_open import describe, open_container, pick_stream, stream_info
from .datatypes import DecodeStats, Loader
from .errors import VideoSourceError
from .limits import MAX_FRAME_PIXELS, check_frame_size, image_header_size
from .reconnect import Reconnect
from .resample import scaled_size
from .timeline import Timeline
from .uri import Target

# Consecutive demuxer failures after which the rest of the input is considered unreadable
# (each retry resynchronises a little further; a dead input would otherwise spin forever).
MAX_DEMUX_ERRORS_IN_ROW = 50

# Used to count frames when a stream has neither timestamps nor a declared rate
# (FFmpeg assumes the same for raw elementary streams).
FALLBACK_FPS = 25


class _ReadFailed(Exception):
    """The input stopped delivering data (network loss, stall, I/O error): not damaged data."""


class AvDecoder:
    """An opened container and its video stream, yielding ``(t, loader)`` per decoded frame."""

    def __init__(
        self,
        uri: str,
        target: Target,
        timeout: float = 10.0,
        *,
        max_pixels: int = MAX_FRAME_PIXELS,
        reconnect: Reconnect = Reconnect(),
    ):
        self.uri = uri
        self.kind = target.kind
        self.max_pixels = max_pixels
        self.reconnect = reconnect
        self.lost_since = 0.0  # when the input stopped delivering (a live stream's time lost on a drop)
        self.read_timeout = reconnect.read_timeout or timeout
        self._target, self._timeout = target, timeout
        if target.kind == "file":
            # Still images (and GIFs) are sized from their header before FFmpeg even probes them:
            # av.open decodes an image once to learn its pixel format.
            size = image_header_size(target.location)
            check_frame_size(uri, *(size or (None, None)), max_pixels)
        self.container = self._reopen()
        try:
            self.stream = pick_stream(uri, self.container)
            # The stream header's size, before a single frame is decoded.
            check_frame_size(uri, self.stream.codec_context.width, self.stream.codec_context.height, max_pixels)
        except VideoSourceError:
            self.container.close()
            raise
        self.info = stream_info(uri, target, self.container, self.stream)

    def _reopen(self) -> av.container.InputContainer:
        # A method, not a lambda capturing self: that cycle kept every closed decoder (its frame pools and
        # threads, tens of MB for HD video) alive until the garbage collector ran (`vrex bench soak`).
        return open_container(self.uri, self._target, self._timeout, self.read_timeout, self.max_pixels)

    def close(self) -> None:
        """Close the input and drop the demuxer and decoder now (safe to call twice)."""
        if self.container is not None:
            self.container.close()
        self.container = self.stream = None  # type: ignore[assignment]

    # -- decoding ---------------------------------------------------------------------------

    def _declared_start(self) -> Fraction | None:
        """A file's declared start time in seconds; None for live inputs or when the file declares none."""
        if self.kind != "file" or self.stream.start_time is None or not self.stream.time_base:
            return None
        return self.stream.start_time * self.stream.time_base

    def _seek(self, start: float, stats: DecodeStats) -> Fraction | None:
        """Jump to the keyframe before ``start`` (files only); returns the time origin used, if any."""
        if start <= 0 or self._declared_start() is None:
            return None
        origin = self.stream.start_time
        try:
            # backward=True lands on a keyframe at or before the target, so no frame >= start is lost.
            self.container.seek(origin + int(start / self.stream.time_base), stream=self.stream, backward=True)
        except av.error.FFmpegError as e:
            stats.warn("seek", f"seeking to {start:.2f} s failed ({describe(e)}); decoding from the start")
            self.container.close()
            self.container = self._reopen()
            self.stream = pick_stream(self.uri, self.container)
            return None
        # After a seek the first decoded frame is not the stream's first: use the declared start.
        return self._declared_start()

    def _packets(self, stats: DecodeStats) -> Iterator[av.Packet]:
        """Demux the video stream, resynchronising after damaged container data."""
        errors_in_row = 0
        while True:
            try:
                for packet in self.container.demux(self.stream):
                    errors_in_row = 0
                    yield packet
                return
            except av.error.InvalidDataError as e:
                errors_in_row += 1
                stats.skipped_corrupt += 1
                stats.warn("corrupt", f"skipped damaged container data ({describe(e)})")
                if errors_in_row >= MAX_DEMUX_ERRORS_IN_ROW:
                    stats.ended_early = True
                    stats.warn("truncated", f"giving up after {errors_in_row} unreadable blocks in a row")
                    return
            except (av.error.ExitError, av.error.TimeoutError) as e:
                # PyAV's read timeout (or the protocol's) fired: the input stalled.
                self.lost_since = time.monotonic() - self.read_timeout
                raise _ReadFailed(f"no data for {self.read_timeout:g} s (stalled)") from e
            except (av.error.FFmpegError, OSError) as e:
                # Network loss, I/O errors: not "a corrupt frame", the input is gone.
                self.lost_since = time.monotonic()
                raise _ReadFailed(describe(e)) from e

    def _decoded(self, stats: DecodeStats) -> Iterator[tuple[av.VideoFrame, bool]]:
        """``(frame, damaged)`` in decoder output order (= presentation order) for one connection."""
        # Decoders flag frames as corrupt until they reach a clean random-access point (H.264: an
        # IDR). After a seek into an IDR-less H.264 file, or when joining such a live stream, the
        # flag then sits on most frames although they look fine. So it only counts once a clean
        # key frame has been decoded in this pass; damage after that point is real damage.
        trust_flag = False
        pending: list[av.VideoFrame] = []
        try:
            for packet in self._packets(stats):
                try:
                    pending = packet.decode()
                except av.error.FFmpegError as e:
                    stats.skipped_corrupt += 1
                    stats.warn("corrupt", f"skipped undecodable packet{_where(packet)} ({describe(e)})")
                    continue
                for frame in pending:
                    damaged = frame.is_corrupt and trust_flag
                    trust_flag = trust_flag or (frame.key_frame and not frame.is_corrupt)
                    yield frame, damaged
        except _ReadFailed as lost:
            # The frames the decoder still holds (its reordering delay) are good: keep them.
            try:
                pending = self.stream.codec_context.decode(None)
            except av.error.FFmpegError:
                pending = []
            for frame in pending:
                yield frame, frame.is_corrupt and trust_flag
            raise lost

    def _stamp(self, frame: av.VideoFrame) -> Fraction | None:
        """The frame's own timestamp in seconds (PTS, else the packet's DTS), as the container counts."""
        ts = frame.pts if frame.pts is not None else frame.dts
        time_base = frame.time_base or self.stream.time_base
        return None if ts is None or not time_base else ts * time_base

    def _period(self) -> Fraction:
        rate = self.stream.average_rate or self.stream.guessed_rate or self.stream.base_rate
        return 1 / Fraction(rate) if rate else Fraction(1, FALLBACK_FPS)

    def frames(self, stats: DecodeStats, start: float = 0.0) -> Iterator[tuple[float, Loader]]:
        """Yield ``(t, loader)`` for each good decoded frame; ``loader(size)`` makes the RGB image.

        Conversion to RGB is deferred to the loader because most frames are dropped by resampling.
        A network source that drops mid-stream is re-opened per ``self.reconnect``.
        """
        origin = self._seek(start, stats)
        # AVI stores no presentation times: FFmpeg guesses them from the chunk order, and only their
        # sorted order can be trusted (see vrex.io.timeline). Other containers store each frame's own.
        decode_order = "avi" in self.container.format.name.split(",")
        if origin is None and not decode_order:
            # t = 0 is the file's declared start, so frames lost at its beginning (damage) do not move
            # it onto the first frame that decodes. (AVI's guessed times may start a tick late; live
            # inputs start wherever they are joined: both keep the first frame as t = 0.)
            origin = self._declared_start()
        timeline: Timeline[tuple[av.VideoFrame, bool]] = Timeline(self._period(), origin, decode_order=decode_order)
        failures = 0  # reconnection attempts since the last good frame
        skip_to: Fraction | None = None  # after resuming a file: frames up to here were already given
        first: Fraction | None = None  # first timestamp of the current connection
        replay_of: Fraction | None = None  # ... and of the previous one, after a live re-open
        while True:
            try:
                for frame, damaged in self._decoded(stats):
                    check_frame_size(self.uri, frame.width, frame.height, self.max_pixels)
                    stamp = self._stamp(frame)
                    if first is None and stamp is not None:
                        first = stamp
                        if stamp == replay_of:
                            # FFmpeg reports the end of an HTTP body without a length as an I/O error;
                            # if re-opening plays the same stream from its start, that was its end.
                            return
                    if skip_to is not None and stamp is not None and stamp <= skip_to:
                        continue
                    if stamp is None and timeline.newest is None:
                        stats.warn("timestamps", "frames without timestamps; timing by frame count at "
                                   f"{float(1 / timeline.period):g} fps")
                    reorder = bool(self.stream.codec_context.has_b_frames)
                    for t, item in timeline.push((frame, damaged), stamp, reorder):
                        if self._emit(t, *item, stats):
                            failures = 0
                            yield t, _loader(item[0])
                problem = None
            except _ReadFailed as e:
                problem = str(e)
            for t, item in timeline.drain():
                if self._emit(t, *item, stats):
                    failures = 0
                    yield t, _loader(item[0])
            if problem is None:
                return  # the end of the input (a connection closed early is an I/O error in FFmpeg)
            if self.kind != "url" or timeline.last is None:
                # Files and devices do not come back; and an input that never gave a frame is not
                # "dropped mid-stream", it is unusable: say so at once.
                raise VideoSourceError(self.uri, f"reading failed: {problem}")
            failures = self._reconnect(problem, failures, timeline.last, stats)
            if failures < 0:
                return
            skip_to = self._resume(timeline)
            # Only HTTP bodies end that way; RTSP and others restart their timestamps on re-open.
            replay_of = first if skip_to is None and self.uri.lower().startswith(("http:", "https:")) else None
            first = None

    def _emit(self, t: float, frame: av.VideoFrame, damaged: bool, stats: DecodeStats) -> bool:
        """Count a frame leaving the timeline; False for a damaged one (skipped, counted, warned)."""
        if damaged:
            # The decoder concealed errors in this picture; don't show a smeared frame.
            stats.skipped_corrupt += 1
            stats.warn("corrupt", f"skipped damaged frame at {t:.2f} s", t)
            return False
        stats.decoded += 1
        return True

    def _reconnect(self, problem: str, failures: int, t: float, stats: DecodeStats) -> int:
        """Re-open with backoff; the failure count so far, or -1 after the last attempt failed."""
        policy = self.reconnect
        while True:
            failures += 1
            if failures > policy.attempts:
                stats.lost = True
                stats.warn("lost", f"gave up after {policy.attempts} reconnection attempt(s): {problem}", t)
                return -1
            delay = policy.delay(failures)
            stats.warn("reconnect", f"{problem}; reconnecting in {delay:g} s "
                       f"(attempt {failures} of {policy.attempts})", t)
            time.sleep(delay)
            self.container.close()
            try:
                self.container = self._reopen()
                self.stream = pick_stream(self.uri, self.container)
                return failures
            except VideoSourceError as e:
                problem = f"re-opening failed: {e.problem}"

    def _resume(self, timeline: Timeline) -> Fraction | None:
        """After re-opening: where to pick up; returns the timestamp up to which frames are skipped."""
        if self.info.duration is not None and timeline.last_abs is not None:
            # A file over HTTP: seek back to the last frame given (a key frame at or before it);
            # if the server cannot seek, decoding restarts at 0. Either way frames up to the
            # last one given are skipped, so none is repeated or lost.
            try:
                ticks = int(timeline.last_abs / self.stream.time_base)
                self.container.seek(ticks, stream=self.stream, backward=True)
            except (av.error.FFmpegError, OSError):
                pass
            return timeline.last_abs
        # A live stream: new timestamps, and the time lost while disconnected really passed.
        gap = max(float(timeline.period), time.monotonic() - self.lost_since)
        timeline.rebase((timeline.last or 0.0) + gap)
        return None


def _where(obj: av.Packet) -> str:
    """' near 12.34 s' from a packet time (absolute, as the container counts), if known."""
    ts = obj.pts if obj.pts is not None else obj.dts
    return f" near {float(ts * obj.time_base):.2f} s" if ts is not None and obj.time_base else ""


def _loader(frame: av.VideoFrame) -> Loader:
    def load(size: int | None) -> Image.Image:
        width, height = scaled_size(frame.width, frame.height, size)
        if (width, height) == (frame.width, frame.height):
            return frame.to_image()
        # AREA averages source pixels when shrinking (no aliasing); bicubic when enlarging.
        interp = "AREA" if width < frame.width else "BICUBIC"
        return frame.to_image(width=width, height=height, interpolation=interp)

    return load
