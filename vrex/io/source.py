"""VideoSource: one iterable over files, network streams, webcams, image folders and folders of videos."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

from .av_backend import AvDecoder
from .datatypes import DecodeStats, Frame, Loader, SourceInfo
from .errors import VideoSourceError
from .events import EndStatus, SourceEnd, SourceWarning
from .images import FrameTooLarge, ImageFolder, UnreadableImage
from .playlist import VideoFolder
from .limits import MAX_FRAME_PIXELS, check_limit
from .reconnect import Reconnect
from .resample import EPS, Resampler
from .uri import resolve

# A file is called truncated when it stops this much before its declared duration
# (at least three frame periods, so VFR jitter and rounding never trigger it).
_EARLY_END_SLACK = 0.5
# Warn when decoded frames are this far apart (or 10 frame periods, if longer).
_GAP_SECONDS = 1.0


def shorter_than_declared(path: str | Path) -> bool:
    """True if a RIFF file (AVI) is shorter than the length its first header states. Cut inside its first
    frames, an AVI loses its index and FFmpeg re-counts its length from what is left (one frame of 159 in
    a fuzzed clip), so the declared duration cannot show the cut; the RIFF size still does."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
        size = Path(path).stat().st_size
    except OSError:
        return False
    return head[:4] == b"RIFF" and head[8:12] == b"AVI " and size < int.from_bytes(head[4:8], "little") + 8


def ends_early(last: float | None, duration: float | None, fps: float | None) -> bool:
    """True if a stream whose last frame is at ``last`` stopped well before its declared ``duration``."""
    if last is None or not duration:
        return False
    return last < duration - max(_EARLY_END_SLACK, 3.0 / fps if fps else 0.0)


class VideoSource:
    """Frames of a video input, resampled to ``fps`` with real presentation timestamps.

    ``uri`` is a file (mp4, webm, avi, gif, ... and a single still image as a one-frame stream),
    a folder of images, a folder of videos (played back to back, :mod:`vrex.io.playlist`), a network URL (rtsp, rtmp, http(s), udp, tcp, srt) or a webcam
    (``webcam``, ``webcam:N``, ``/dev/videoN``). Opening happens in the constructor, so a bad
    input raises :class:`VideoSourceError` right away; ``info`` then describes the input.

    Iterating yields :class:`Frame` objects; ``stats`` counts what happened during the latest
    pass, ``stats.records`` lists its warnings as :class:`SourceWarning` data (also passed to
    ``on_warning`` as they happen) and ``end_of_stream`` says how the pass ended (:class:`SourceEnd`:
    complete, stopped, truncated, lost or failed). Iterating again re-opens the input and starts
    over. Use as a context manager (or call :meth:`close`) to release the input early.

    Args:
        fps: target rate; ``None`` or ``0`` emits every frame. A slower source is never padded
            with duplicates: each frame is emitted once at its own time (see :class:`Resampler`).
        max_frames: stop after emitting this many frames.
        start, end: time window in seconds (``start <= t < end``). Files seek to ``start``.
        size: scale every frame so its shorter side has this many pixels (aspect kept).
        realtime: pace emission to the wall clock, to replay a file as if it were live.
            Frames are never dropped to catch up with a slow consumer.
        webcam_format: FFmpeg capture demuxer to use instead of the OS default
            (``v4l2`` on Linux, ``avfoundation`` on macOS, ``dshow`` on Windows).
        image_duration: seconds each image of a folder lasts; default ``1/fps`` (1 s if fps is None).
        av_options: extra FFmpeg options for ``av.open`` (e.g. ``{"input_format": "mjpeg"}``).
        timeout: seconds to wait when opening or reading network streams and webcams.
        reconnect: retries for network sources that drop or stall mid-stream (:class:`Reconnect`;
            default 5 attempts, backoff 0.5 s doubling to 8 s, stall after ``timeout`` s).
        max_frame_pixels: largest frame (width x height) decoded; larger ones are refused from
            the header, before decoding (:data:`vrex.io.limits.MAX_FRAME_PIXELS` by default).
        on_warning: called with each :class:`SourceWarning` as it happens (e.g. to print JSON).
        loop: play a file or a folder again and again on one clock (each pass starts one
            frame period after the previous one's last frame): a stream of any length from short
            clips. It ends only at ``max_frames``, ``end`` or when the consumer stops. Not for live
            inputs (URLs, webcams), which have no second pass.
    """

    def __init__(
        self,
        uri: str | Path,
        fps: float | None = 2.0,
        *,
        max_frames: int | None = None,
        start: float = 0.0,
        end: float | None = None,
        size: int | None = None,
        realtime: bool = False,
        webcam_format: str | None = None,
        image_duration: float | None = None,
        av_options: dict[str, str] | None = None,
        timeout: float = 10.0,
        reconnect: Reconnect | None = None,
        max_frame_pixels: int = MAX_FRAME_PIXELS,
        on_warning: Callable[[SourceWarning], None] | None = None,
        loop: bool = False,
    ):
        if fps is not None and fps < 0:
            raise ValueError(f"fps must be positive, 0 or None, got {fps}")
        if max_frames is not None and max_frames < 0:
            raise ValueError(f"max_frames must be >= 0, got {max_frames}")
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"need 0 <= start <= end, got start={start}, end={end}")
        if size is not None and size <= 0:
            raise ValueError(f"size must be a positive number of pixels, got {size}")
        self.uri = str(uri)
        self.fps = fps or None
        self.max_frames, self.start, self.end = max_frames, start, end
        self.size, self.realtime = size, realtime
        self.image_duration = image_duration or (1.0 / self.fps if self.fps else 1.0)
        self._target = resolve(uri, webcam_format=webcam_format, av_options=av_options, timeout=timeout)
        if loop and self._target.kind not in ("file", "images", "videos"):
            raise VideoSourceError(self.uri, f"cannot loop a {self._target.kind} input: only files and folders "
                                             "have a second pass")
        self.loop = loop
        self._timeout = timeout
        self.reconnect = reconnect or Reconnect()
        self.max_frame_pixels = check_limit(max_frame_pixels)
        self.on_warning = on_warning
        self._backend = self._open()
        self._used = False
        self._pass: Iterator[Frame] | None = None
        self.info: SourceInfo = self._backend.info
        self.stats = DecodeStats(self.uri)
        self.end_of_stream: SourceEnd | None = None
        """How the latest pass ended; None before the first pass ends."""

    def _open(self) -> AvDecoder | ImageFolder | VideoFolder:
        if self._target.kind == "images":
            return ImageFolder(self.uri, Path(self._target.location), self.image_duration, self.max_frame_pixels)
        if self._target.kind == "videos":
            return VideoFolder(self.uri, Path(self._target.location), self._timeout, max_pixels=self.max_frame_pixels,
                               reconnect=self.reconnect)
        return AvDecoder(self.uri, self._target, self._timeout, max_pixels=self.max_frame_pixels,
                         reconnect=self.reconnect)

    def __iter__(self) -> Iterator[Frame]:
        if self._used:
            self._finish_pass()
            self._backend.close()
            self._backend = self._open()
        self._used = True
        self.stats = DecodeStats(self.uri, listener=self.on_warning)
        self.end_of_stream = None
        self._pass = self._run(self.stats)
        return self._pass

    def _run(self, stats: DecodeStats) -> Iterator[Frame]:
        """One pass: ``self._backend``'s frames (re-opened per pass of a loop), resampled, checked, counted."""
        resampler = Resampler(self.fps, self.start)
        pacer = _Pacer() if self.realtime else None
        last_seen: float | None = None
        gap_limit = self._gap_limit()
        status: EndStatus = "stopped"
        reason = "the consumer stopped reading"
        try:
            if self.max_frames == 0:
                reason = "max_frames is 0"
                return
            for t, load in self._timeline(stats):
                if self.end is not None and t >= self.end - EPS:
                    reason = f"end time {self.end:g} s reached"
                    break
                if gap_limit is not None and last_seen is not None and t - last_seen > gap_limit:
                    # Demuxers such as Matroska resynchronise silently past damaged data.
                    stats.warn(
                        "gap",
                        f"no frames between {last_seen:.2f} s and {t:.2f} s"
                        " (data lost, or a pause in a variable-rate stream)",
                        t,
                    )
                last_seen = t if last_seen is None else max(last_seen, t)
                if resampler.is_backwards(t):
                    stats.skipped_out_of_order += 1
                    stats.warn("out_of_order", f"dropped a frame whose time {t:.3f} s does not advance", t)
                    continue
                if not resampler.accept(t):
                    continue
                try:
                    image = load(self.size)
                except FrameTooLarge as e:
                    stats.warn("too_large", f"skipped image {e}", t)
                    continue
                except UnreadableImage as e:
                    stats.skipped_corrupt += 1
                    stats.warn("corrupt", f"skipped unreadable image {e}", t)
                    continue
                if pacer is not None:
                    pacer.wait(t)
                frame = Frame(t=t, image=image, index=stats.emitted)
                stats.emitted += 1  # before yielding: a consumer may stop right after this frame
                yield frame
                if self.max_frames is not None and stats.emitted >= self.max_frames:
                    reason = f"max_frames={self.max_frames} reached"
                    break
            else:
                status, reason = self._check_complete(stats, last_seen)
        except VideoSourceError as e:
            status, reason = "failed", str(e)
            raise
        except Exception as e:
            status, reason = "failed", f"{type(e).__name__}: {e}"
            raise
        finally:
            self._backend.close()
            stats.finish()
            counts = dict(stats.counts)
            self.end_of_stream = SourceEnd(self.uri, status, reason, resampler.last_t, stats.emitted, counts)

    def _timeline(self, stats: DecodeStats) -> Iterator[tuple[float, Loader]]:
        """The input's frames as ``(t, loader)``; with ``loop``, pass after pass on one clock (the input
        re-opened each time; ``start`` applies to the first pass only)."""
        offset, start = 0.0, self.start
        while True:
            last = None
            for t, load in self._backend.frames(stats, start):
                last = t
                yield offset + t, load
            if not self.loop or last is None:  # a pass with no frame would loop forever
                return
            offset += last + self._period()
            start = 0.0
            self._backend.close()
            self._backend = self._open()

    def _period(self) -> float:
        """One frame's duration: the gap left between two passes of a loop."""
        if self.info.kind == "images":
            return self.image_duration
        return 1.0 / (self.info.native_fps or self.fps or 1.0)

    def _gap_limit(self) -> float | None:
        """Longest silence between two decoded frames that passes without a warning."""
        if self.info.kind not in ("file", "url") or self.info.codec == "gif":
            return None  # image timings and GIF frame delays are arbitrary by design
        fps = self.info.native_fps
        return max(_GAP_SECONDS, 10.0 / fps if fps else 0.0)

    def _check_complete(self, stats: DecodeStats, last_seen: float | None) -> tuple[EndStatus, str]:
        """After the input ran out: fail if nothing decoded, flag a stream that ended too soon."""
        if stats.decoded == 0:
            why = f" ({stats.skipped_corrupt} damaged packets/frames skipped)" if stats.skipped_corrupt else ""
            raise VideoSourceError(self.uri, f"no decodable video frames{why}")
        if stats.lost:
            return "lost", stats.records[-1].reason if stats.records else "connection lost"
        why = self._ended_short(stats, last_seen)
        if why is not None:
            stats.ended_early = True
            stats.warn("truncated", why, last_seen)
            return "truncated", why
        if stats.ended_early:
            return "truncated", "the rest of the input is unreadable"
        return "complete", "the input ended"

    def _ended_short(self, stats: DecodeStats, last_seen: float | None) -> str | None:
        """Why a pass that ran out of input is shorter than the input declares, or None."""
        declared = self.info.duration
        if self.info.kind == "file" and shorter_than_declared(self._target.location):
            return "the file is shorter than its header declares (truncated?)"
        if self.info.kind in ("file", "url") and ends_early(last_seen, declared, self.info.native_fps):
            return (f"stream ended at {last_seen:.2f} s but the container declares {declared:.2f} s"
                    " (truncated or damaged file?)")
        counted = self.info.declared_frames
        if (self.info.kind == "file" and self.start == 0 and counted
                and stats.decoded + stats.skipped_corrupt < counted - max(3, counted // 10)):
            # A damaged MP4 header can shrink the edit list and the declared duration with it (one flipped
            # bit in the movie timescale: 1 frame of 400 decoded, 'complete', found by fuzzing); the
            # sample table still counts every frame.
            return (f"decoded {stats.decoded} of the {counted} frames the container counts"
                    " (damaged header, or an edit list that cuts the stream?)")
        return None

    def _finish_pass(self) -> None:
        """End a pass the consumer left unfinished, so ``end_of_stream`` says so and the input is released."""
        if self._pass is not None:
            try:
                self._pass.close()  # type: ignore[attr-defined]  # runs _run's finally: status "stopped"
            except ValueError:
                pass  # being iterated in another thread right now: its own loop ends the pass
            self._pass = None

    def close(self) -> None:
        """Release the file, socket or device (safe to call twice; iterating again re-opens)."""
        self._finish_pass()
        self._backend.close()
        self._used = True

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VideoSource({self.uri!r}, fps={self.fps}, kind={self.info.kind!r})"


class _Pacer:
    """Sleep so that the frame at stream time ``t`` leaves at ``first wall time + (t - first t)``."""

    def __init__(self) -> None:
        self.offset: float | None = None

    def wait(self, t: float) -> None:
        now = time.monotonic()
        if self.offset is None:
            self.offset = now - t
            return
        delay = self.offset + t - now
        if delay > 0:
            time.sleep(delay)


def open_source(uri: str | Path, fps: float | None = 2.0, **kw: object) -> VideoSource:
    """Open ``uri`` as a :class:`VideoSource`; keyword arguments are those of VideoSource.

    Dispatch, in order: ``webcam``, ``webcam:N``, ``webcam:<name>`` and ``/dev/videoN`` are capture
    devices; ``rtsp://``, ``rtsps://``, ``rtmp://``, ``rtmps://``, ``http(s)://``, ``udp://``,
    ``tcp://`` and ``srt://`` are network streams; ``file://`` URLs and plain paths to an existing
    folder are image folders (images sorted by name) or, when the folder holds video files, folders of
    videos played back to back (both in one folder is an error), and to an existing file are video files.
    Anything else raises :class:`VideoSourceError` naming the input.
    """
    return VideoSource(uri, fps, **kw)  # type: ignore[arg-type]
