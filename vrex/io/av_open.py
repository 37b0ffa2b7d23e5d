"""Open an input with PyAV and pick its video stream, with errors that name the input and say why."""

from __future__ import annotations

from fractions import Fraction

import av
from av.stream import Disposition

from .datatypes import SourceInfo
from .errors import VideoSourceError
from .uri import Target


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
    previous, skip = av.logging.get_level(), av.logging.get_skip_repeated()
    try:
        av.logging.set_level(av.logging.ERROR)
        # PyAV drops a log line equal to the previous one: the second damaged file in a process lost its
        # reason ('moov atom not found'), found by the media fuzzer running before tests/io/test_io_damaged.py.
        av.logging.set_skip_repeated(False)
        with av.logging.Capture(local=True) as logs:
            try:
                av.open(target.location, format=target.format, options=target.options).close()
            except (av.error.FFmpegError, OSError, UnicodeDecodeError):
                pass
    finally:
        av.logging.set_level(previous)
        av.logging.set_skip_repeated(skip)
    messages = [str(entry[2]).strip() for entry in logs if entry[2] and str(entry[2]).strip()]
    return messages[-1] if messages else None


def open_container(
    uri: str, target: Target, timeout: float, read_timeout: float, max_pixels: int
) -> av.container.InputContainer:
    """``av.open`` the target; network and capture inputs get open and read (stall) timeouts."""
    live = target.kind in ("url", "webcam")
    try:
        return av.open(
            target.location,
            format=target.format,
            # FFmpeg's own guard: the decode that probes the stream refuses larger pictures.
            options={"max_pixels": str(max_pixels), **target.options},
            # The read timeout is checked per packet read: no data for that long is a stall.
            timeout=(timeout, read_timeout) if live else None,
            # Damaged tags are not UTF-8; strict decoding made av.open raise UnicodeDecodeError (tests/io/test_fuzz_media.py).
            metadata_errors="replace",
        )
    except FileNotFoundError as e:  # av.error.FileNotFoundError subclasses the builtin
        what = "no such device" if target.kind == "webcam" else "no such file"
        raise VideoSourceError(uri, f"{what} ({describe(e)})") from e
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
        raise VideoSourceError(uri, f"cannot open as video: {reason} ({hint})") from e


def pick_stream(uri: str, container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """The first real video stream (not cover art), set up for threaded decoding."""
    if container.format.name == "tty":
        # FFmpeg renders text files (.txt, .nfo, ...) as ANSI-art "video"; that is not a video.
        raise VideoSourceError(uri, "not a video (it is a text file)")
    for stream in container.streams.video:
        # Cover art in audio files shows up as a one-picture "video" stream. A damaged header can name a
        # codec FFmpeg has no decoder for: no codec context (an AttributeError here before the fuzzer found it).
        if not stream.disposition & Disposition.attached_pic and stream.codec_context is not None:
            # Frame threading decodes several frames in parallel, slice threading one faster.
            stream.codec_context.thread_type = "AUTO"
            return stream
    found = ", ".join(s.type for s in container.streams) or "no streams"
    raise VideoSourceError(uri, f"no video stream (found: {found})")


def stream_info(uri: str, target: Target, container: av.container.InputContainer,
                stream: av.video.stream.VideoStream) -> SourceInfo:
    """What the container declares (None where it is silent)."""
    cc = stream.codec_context
    if stream.duration is not None and stream.time_base:
        duration: float | None = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / av.time_base
    else:
        duration = None
    if not duration and stream.frames and (stream.average_rate or stream.guessed_rate):
        # An AVI cut after its header loses its index, so FFmpeg says 0 s; the header still counts the
        # frames, and without a length a cut file ended "complete" after one frame of 795 (fuzzing).
        duration = stream.frames / float(stream.average_rate or stream.guessed_rate)
    rate = _as_float(stream.average_rate) or _as_float(stream.guessed_rate) or _as_float(stream.base_rate)
    return SourceInfo(uri=uri, kind=target.kind, width=cc.width or None, height=cc.height or None,
                      native_fps=rate, duration=duration, codec=cc.name, declared_frames=stream.frames or None)


def _as_float(rate: Fraction | None) -> float | None:
    return float(rate) if rate else None
