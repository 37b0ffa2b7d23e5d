"""A folder of video files played back to back on one clock: ``vrex run DIR`` when DIR holds videos.

Every file is opened once up front (a file that is not a readable video is an error naming it, before
anything plays), then decoded in turn. File ``i`` starts where the ones before it end by their
declared durations, so a frame's time does not depend on decoding the earlier files (a ``start``
skips whole files unopened). A file that declares no duration is timed by its last decoded frame plus
one frame period.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .av_backend import AvDecoder
from .clips import VIDEO_SUFFIXES
from .datatypes import DecodeStats, Loader, SourceInfo
from .errors import VideoSourceError
from .images import natural_key
from .limits import MAX_FRAME_PIXELS
from .reconnect import Reconnect
from .uri import Target

# Containers of moving pictures: the demo clips' kinds (vrex.io.clips) and a few more a user's folder may
# hold. GIFs count too: in a folder of videos they are clips (in a folder of images, stills); a folder is
# a video folder when it holds any of the others.
VIDEO_FILE_SUFFIXES = (frozenset(VIDEO_SUFFIXES) - {".gif"}) | {".m4v", ".mpg", ".mpeg", ".ts", ".flv"}
CLIP_SUFFIXES = VIDEO_FILE_SUFFIXES | {".gif"}


def list_videos(folder: Path) -> list[Path]:
    """Video files directly inside ``folder``, in natural name order (GIFs included when any other is there)."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in CLIP_SUFFIXES]
    if not any(p.suffix.lower() in VIDEO_FILE_SUFFIXES for p in files):
        return []
    return sorted(files, key=natural_key)


class VideoFolder:
    """The videos of a folder, back to back (see the module docstring); yields ``(t, loader)`` as AvDecoder does."""

    def __init__(self, uri: str, folder: Path, timeout: float = 10.0, *, max_pixels: int = MAX_FRAME_PIXELS,
                 reconnect: Reconnect | None = None):
        self.uri, self._timeout, self._max_pixels = uri, timeout, max_pixels
        self._reconnect = reconnect or Reconnect()
        self.paths = list_videos(folder)
        if not self.paths:
            raise VideoSourceError(uri, "folder has no video files")
        self.durations: list[float | None] = []
        first: SourceInfo | None = None
        for path in self.paths:
            decoder = self._decoder(path)  # raises VideoSourceError naming the file
            self.durations.append(decoder.info.duration or None)
            first = first or decoder.info
            decoder.close()
        total = sum(self.durations) if all(self.durations) else None  # type: ignore[arg-type]
        self.info = SourceInfo(uri, "videos", first.width, first.height, first.native_fps, total, None)
        self._current: AvDecoder | None = None

    def _decoder(self, path: Path) -> AvDecoder:
        try:
            return AvDecoder(str(path), Target("file", str(path)), self._timeout, max_pixels=self._max_pixels,
                             reconnect=self._reconnect)
        except VideoSourceError as e:
            raise VideoSourceError(self.uri, f"{path.name} in this folder is not a playable video ({e})") from e

    def frames(self, stats: DecodeStats, start: float = 0.0) -> Iterator[tuple[float, Loader]]:
        offset = 0.0
        for path, duration in zip(self.paths, self.durations):
            if duration is not None and offset + duration <= start:
                offset += duration  # wholly before the start: not opened
                continue
            decoder = self._current = self._decoder(path)
            last = None
            try:
                for t, load in decoder.frames(stats, max(0.0, start - offset)):
                    last = t
                    yield offset + t, load
            finally:
                decoder.close()
                self._current = None
            if duration is not None:
                offset += duration
            elif last is not None:
                offset += last + 1.0 / (decoder.info.native_fps or 25.0)

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None


__all__ = ["VideoFolder", "list_videos", "VIDEO_FILE_SUFFIXES", "CLIP_SUFFIXES"]
