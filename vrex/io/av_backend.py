"""Decode one video stream with PyAV: files, network streams and capture devices.

Only the chosen video stream is demuxed; audio and other streams are never decoded, so a broken
audio track cannot stop the video.
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction

import av
from av.stream import Disposition
from PIL import Image

from .datatypes import DecodeStats, Loader, SourceInfo
from .errors import VideoSourceError
from .resample import scaled_size
from .uri import Target

# Consecutive demuxer failures after which the rest of the input is considered unreadable
# (each retry resynchronises a little further; a dead input would otherwise spin forever).
MAX_DEMUX_ERRORS_IN_ROW = 50

# Used to count frames when a stream has neither timestamps nor a declared rate
# (FFmpeg assumes the same for raw elementary streams).
FALLBACK_FPS = 25.0


def describe(err: BaseException) -> str:
    """FFmpeg's error text plus its last log line (e.g. 'moov atom not found'), if any."""
    text = getattr(err, "strerror", None) or str(err)
    log = getattr(err, "log", None)
    if log and len(log) >= 3 and log[2] and log[2].strip() not in text:
        text = f"{text}; {log[2].strip()}"
    return text


def _explain_open_failure(target: Target) -> str | None:
    """FFmpeg's own reason (e.g. 'moov atom not found') for a file that failed to open.

    PyAV keeps FFmpeg's log switched off, so the exception alone only says "Invalid data". Opening
    a local file again with the log captured is cheap and only happens on this error path.
    """
    previous = av.logging.get_level()
    try:
        av.logging.set_level(av.logging.ERROR)
        with av.logging.Capture(local=True) as logs:
            try:
                av.open(target.location, format=target.format, options=target.options).close()
            except (av.error.FFmpegError, OSError):
                pass
    finally:
        av.logging.set_level(previous)
    messages = [str(entry[2]).strip() for entry in logs if entry[2] and str(entry[2]).strip()]
    return messages[-1] if messages else None


def _as_float(rate: Fraction | None) -> float | None:
    return float(rate) if rate else None


class AvDecoder:
    """An opened container and its video stream, yielding ``(t, loader)`` per decoded frame."""

    def __init__(self, uri: str, target: Target, timeout: float = 10.0):
        self.uri = uri
        self.kind = target.kind
        self._reopen = lambda: self._open(target, timeout)
        self.container = self._reopen()
        try:
            self.stream = self._pick_stream()
        except VideoSourceError:
            self.container.close()
            raise
        self.info = self._info()

    # -- opening ----------------------------------------------------------------------------

    def _open(self, target: Target, timeout: float) -> av.container.InputContainer:
        live = target.kind in ("url", "webcam")
        try:
            return av.open(
                target.location,
                format=target.format,
                options=target.options,
                timeout=(timeout, timeout) if live else None,
            )
        except FileNotFoundError as e:  # av.error.FileNotFoundError subclasses the builtin
            what = "no such device" if target.kind == "webcam" else "no such file"
            raise VideoSourceError(self.uri, f"{what} ({describe(e)})") from e
        except (av.error.FFmpegError, OSError) as e:
            reason = describe(e)
            detail = _explain_open_failure(target) if target.kind == "file" else None
            if detail and detail not in reason:
                reason = f"{reason}; {detail}"
            hint = {
                "file": "truncated, corrupt or not a video file?",
                "url": "server unreachable, wrong address or unsupported stream?",
                "webcam": "device busy, unsupported or not a camera?",
            }[target.kind]
            raise VideoSourceError(self.uri, f"cannot open as video: {reason} ({hint})") from e

    def _pick_stream(self) -> av.video.stream.VideoStream:
        if self.container.format.name == "tty":
            # FFmpeg renders text files (.txt, .nfo, ...) as ANSI-art "video"; that is not a video.
            raise VideoSourceError(self.uri, "not a video (it is a text file)")
        for stream in self.container.streams.video:
            # Cover art in audio files shows up as a one-picture "video" stream.
            if not stream.disposition & Disposition.attached_pic:
                # Frame threading decodes several frames in parallel, slice threading one faster.
                stream.codec_context.thread_type = "AUTO"
                return stream
        found = ", ".join(s.type for s in self.container.streams) or "no streams"
        raise VideoSourceError(self.uri, f"no video stream (found: {found})")

    def _info(self) -> SourceInfo:
        s, cc = self.stream, self.stream.codec_context
        if s.duration is not None and s.time_base:
            duration: float | None = float(s.duration * s.time_base)
        elif self.container.duration:
            duration = self.container.duration / av.time_base
        else:
            duration = None
        return SourceInfo(
            uri=self.uri,
            kind=self.kind,
            width=cc.width or None,
            height=cc.height or None,
            native_fps=_as_float(s.average_rate) or _as_float(s.guessed_rate) or _as_float(s.base_rate),
            duration=duration,
            codec=cc.name,
        )

    def close(self) -> None:
        self.container.close()

    # -- decoding ---------------------------------------------------------------------------

    def _seek(self, start: float, stats: DecodeStats) -> int | None:
        """Jump to the keyframe before ``start`` (files only); returns the PTS origin used, if any."""
        origin = self.stream.start_time
        if start <= 0 or self.kind != "file" or origin is None or not self.stream.time_base:
            return None
        try:
            # backward=True lands on a keyframe at or before the target, so no frame >= start is lost.
            self.container.seek(origin + int(start / self.stream.time_base), stream=self.stream, backward=True)
        except av.error.FFmpegError as e:
            stats.warn(self.uri, f"seeking to {start:.2f} s failed ({describe(e)}); decoding from the start")
            self.container.close()
            self.container = self._reopen()
            self.stream = self._pick_stream()
            return None
        # After a seek the first decoded frame is not the stream's first: use the declared start.
        return origin

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
                stats.warn(self.uri, f"skipped damaged container data ({describe(e)})")
                if errors_in_row >= MAX_DEMUX_ERRORS_IN_ROW:
                    stats.ended_early = True
                    stats.warn(self.uri, f"giving up after {errors_in_row} unreadable blocks in a row")
                    return
            except (av.error.FFmpegError, OSError) as e:
                # Network loss, timeouts, I/O errors: not "a corrupt frame", the input is gone.
                raise VideoSourceError(self.uri, f"reading failed: {describe(e)}") from e

    def frames(self, stats: DecodeStats, start: float = 0.0) -> Iterator[tuple[float, Loader]]:
        """Yield ``(t, loader)`` for each good decoded frame; ``loader(size)`` makes the RGB image.

        Conversion to RGB is deferred to the loader because most frames are dropped by resampling.
        """
        clock = _Clock(self.stream, self._seek(start, stats), stats, self.uri)
        # Decoders flag frames as corrupt until they reach a clean random-access point (H.264: an
        # IDR). After a seek into an IDR-less H.264 file, or when joining such a live stream, the
        # flag then sits on most frames although they look fine. So it only counts once a clean
        # key frame has been decoded in this pass; damage after that point is real damage.
        trust_flag = False
        for packet in self._packets(stats):
            try:
                decoded = packet.decode()
            except av.error.FFmpegError as e:
                stats.skipped_corrupt += 1
                stats.warn(self.uri, f"skipped undecodable packet{_where(packet)} ({describe(e)})")
                continue
            for frame in decoded:
                if frame.is_corrupt and trust_flag:
                    # The decoder concealed errors in this picture; don't show a smeared frame.
                    stats.skipped_corrupt += 1
                    stats.warn(self.uri, f"skipped damaged frame{_where(frame)}")
                    continue
                trust_flag = trust_flag or (frame.key_frame and not frame.is_corrupt)
                stats.decoded += 1
                yield clock(frame), _loader(frame)


def _where(obj: av.Packet | av.VideoFrame) -> str:
    """' near 12.34 s' from a packet/frame time (absolute, as the container counts), if known."""
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


class _Clock:
    """Seconds since the stream's first frame, from real PTS, with fallbacks when PTS is missing."""

    def __init__(self, stream: av.video.stream.VideoStream, origin: int | None, stats: DecodeStats, uri: str):
        self.time_base = stream.time_base
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        self.period = 1.0 / float(rate) if rate else 1.0 / FALLBACK_FPS
        self.origin = origin
        self.last: float | None = None
        self.stats, self.uri = stats, uri
        self.warned = False

    def __call__(self, frame: av.VideoFrame) -> float:
        ts = frame.pts if frame.pts is not None else frame.dts
        time_base = frame.time_base or self.time_base
        if ts is None or not time_base:
            # Raw elementary streams (.h264 over a pipe/socket) carry no timestamps: count frames
            # at the declared rate so the stream stays usable, and say so once.
            if not self.warned:
                self.warned = True
                self.stats.warn(
                    self.uri, f"frames without timestamps; timing by frame count at {1 / self.period:g} fps"
                )
            t = 0.0 if self.last is None else self.last + self.period
        else:
            if self.origin is None:
                self.origin = ts
            t = float((ts - self.origin) * time_base)
        self.last = t
        return t
