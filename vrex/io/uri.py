"""Turn what the user typed (path, URL, device) into something PyAV or the image reader can open."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from .datatypes import SourceKind
from .errors import VideoSourceError

URL_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt")

# FFmpeg options are strings; socket timeouts are in microseconds.
_US = 1_000_000


@dataclass(frozen=True)
class Target:
    """A resolved input: which reader, what to open, and with which FFmpeg demuxer/options."""

    kind: SourceKind
    location: str
    format: str | None = None
    options: dict[str, str] = field(default_factory=dict)


def resolve(
    uri: str | Path,
    *,
    webcam_format: str | None = None,
    av_options: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Target:
    """Classify ``uri`` (see :func:`vrex.io.open_source` for the rules) or raise VideoSourceError."""
    text = str(uri).strip()
    if not text:
        raise VideoSourceError(repr(uri), "empty input name")
    extra = dict(av_options or {})

    if text == "webcam" or text.startswith("webcam:") or text.startswith("/dev/video"):
        return _webcam(text, webcam_format, extra)

    scheme = urlparse(text).scheme.lower() if "://" in text else ""
    if scheme == "file":
        text = unquote(urlparse(text).path)
    elif scheme in URL_SCHEMES:
        return Target("url", text, None, {**_url_options(scheme, timeout), **extra})
    elif scheme:
        raise VideoSourceError(
            text, f"unsupported URL scheme {scheme!r} (use one of {', '.join(URL_SCHEMES)}, a file or a folder)"
        )

    path = Path(text).expanduser()
    if path.is_dir():
        return Target(_folder_kind(path), str(path))
    if path.is_file():
        return Target("file", str(path), None, extra)
    if path.exists():
        raise VideoSourceError(text, "not a regular file, folder, URL or webcam")
    raise VideoSourceError(text, "no such file")


def _folder_kind(path: Path) -> SourceKind:
    """A folder of videos plays them back to back; otherwise it is a folder of images (GIFs among videos
    are clips, among images stills). Both kinds in one folder is refused: one would be dropped."""
    from .images import list_images
    from .playlist import list_videos

    videos = list_videos(path)
    if not videos:
        return "images"
    stills = [p.name for p in list_images(path) if p.suffix.lower() != ".gif"]
    if stills:
        raise VideoSourceError(str(path), f"folder holds both videos ({videos[0].name}, ...) and images "
                                          f"({stills[0]}, ...): keep one kind per folder")
    return "videos"


def _url_options(scheme: str, timeout: float) -> dict[str, str]:
    """Defaults that make network sources fail fast instead of hanging forever."""
    us = str(int(timeout * _US))
    if scheme in ("rtsp", "rtsps"):
        # TCP interleaving survives NAT/firewalls and does not lose packets like RTP over UDP.
        return {"rtsp_transport": "tcp", "timeout": us}
    if scheme == "udp":
        # A big FIFO and non-fatal overruns keep MPEG-TS over UDP going when we read slowly.
        return {"timeout": us, "fifo_size": "1000000", "overrun_nonfatal": "1"}
    return {"rw_timeout": us}


def _webcam(text: str, fmt: str | None, extra: dict[str, str]) -> Target:
    """Map ``webcam``, ``webcam:N``, ``webcam:<name>`` or ``/dev/videoN`` to the OS capture demuxer."""
    device = text.split(":", 1)[1] if text.startswith("webcam:") else ("0" if text == "webcam" else text)
    if not device:
        raise VideoSourceError(text, "empty webcam device (use webcam, webcam:N or /dev/videoN)")

    if sys.platform.startswith("linux"):
        dev = f"/dev/video{device}" if re.fullmatch(r"\d+", device) else device
        if not Path(dev).exists():
            raise VideoSourceError(text, f"no such webcam device {dev}")
        return Target("webcam", dev, fmt or "v4l2", extra)
    if sys.platform == "darwin":
        # "N:none" = video device N, no audio; avfoundation refuses to start without a frame rate.
        return Target("webcam", f"{device}:none", fmt or "avfoundation", {"framerate": "30", **extra})
    if sys.platform == "win32":
        if device.isdigit():
            raise VideoSourceError(text, "DirectShow needs the camera's name: use webcam:<device name>")
        return Target("webcam", f"video={device}", fmt or "dshow", extra)
    if fmt is None:
        raise VideoSourceError(text, f"no default webcam input format on {sys.platform}; pass webcam_format")
    return Target("webcam", device, fmt, extra)
