"""Server-side sources: an uploaded video, a file in ``--media-dir`` or a URL (``--allow-urls``).

Each plays in its own thread at real speed (``open_source(..., realtime=True)``) into the session's
input slot, so a machine that falls behind drops frames exactly as with a live camera. Paths are
only ever names inside the operator's media directory; an arbitrary server path is refused.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from vrex.io import VideoSourceError, open_source
from vrex.serve.limits import ClientError

URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "rtmps://", "http://", "https://", "srt://")
MEDIA_SUFFIXES = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".gif", ".m4v", ".ogv"}


def media_path(name: str, media_dir: Path | None) -> Path:
    """``name`` resolved inside ``media_dir``; ClientError if media is off or the name leaves the folder."""
    if media_dir is None:
        raise ClientError(403, "server-side files are off: start the server with --media-dir DIR to allow files from DIR")
    root = media_dir.resolve()
    path = (root / name).resolve()
    if root not in path.parents or not path.is_file():
        raise ClientError(404, f"no media file {name!r} in the server's media directory")
    return path


def list_media(media_dir: Path | None) -> list[str]:
    if media_dir is None:
        return []
    root = media_dir.resolve()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_SUFFIXES)


def check_url(url: str, allow_urls: bool) -> str:
    if not allow_urls:
        raise ClientError(403, "stream URLs are off: start the server with --allow-urls to let it open URLs")
    if not url.startswith(URL_SCHEMES):
        raise ClientError(422, f"URL {url!r} must start with one of {', '.join(URL_SCHEMES)}")
    return url


class SourcePlayer:
    """Plays ``uri`` into ``session`` (a LiveSession) until the end, an error or ``stop()``."""

    def __init__(self, session: Any, uri: str, label: str, fps: float, cleanup: Path | None = None):
        self.session, self.uri, self.label, self.cleanup = session, uri, label, cleanup
        try:
            # Opening checks the input now, so a broken upload is refused in the request itself.
            self._source = open_source(uri, fps=fps, realtime=True, size=session.limits.model_side)
        except VideoSourceError as e:
            self._remove()
            raise ClientError(422, f"cannot play {label}: {e}") from None
        self._stop = threading.Event()
        self.frames, self.state = 0, "playing"
        self._thread = threading.Thread(target=self._run, name=f"vrex-source-{session.id}", daemon=True)

    def start(self) -> "SourcePlayer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "state": self.state, "frames": self.frames}

    def _run(self) -> None:
        try:
            for frame in self._source:
                if self._stop.is_set() or self.session.state != "live":
                    break
                self.session.offer_frame(frame.image)
                self.frames += 1
            self.state = "stopped" if self._stop.is_set() else "ended"
        except Exception as e:  # noqa: BLE001 - a broken stream ends this source only
            self.state = "failed"
            self.session.emit({"type": "error", "fatal": False, "message": f"source {self.label} failed: {e}"})
        finally:
            self._source.close()
            self._remove()
        self.session.emit({"type": "source", "state": self.state, "label": self.label, "frames": self.frames})

    def _remove(self) -> None:
        if self.cleanup is not None:
            self.cleanup.unlink(missing_ok=True)
