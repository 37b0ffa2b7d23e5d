"""Plain data types shared by the video sources."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from .errors import VideoDecodeWarning

log = logging.getLogger("vrex.io")

SourceKind = Literal["file", "url", "webcam", "images"]

# Deferred RGB conversion of a decoded frame: ``loader(size)`` -> image (shorter side = size).
Loader = Callable[[int | None], Image.Image]

# Long damaged streams can produce thousands of events: keep the first ones verbatim and
# count the rest, so neither the terminal nor ``stats.warnings`` grows without bound.
MAX_WARNINGS = 20


@dataclass(frozen=True)
class Frame:
    """One emitted (resampled) frame."""

    t: float
    """Presentation time in seconds from the stream's first frame (real PTS, not index/fps)."""
    image: Image.Image
    """RGB picture."""
    index: int
    """Position among the emitted frames (0, 1, 2, ...)."""


@dataclass
class SourceInfo:
    """What is known about a source after opening it (``None`` where the container is silent)."""

    uri: str
    kind: SourceKind
    width: int | None
    height: int | None
    native_fps: float | None
    duration: float | None
    codec: str | None


@dataclass
class DecodeStats:
    """Counters for one pass over a source; reset each time the source is iterated."""

    decoded: int = 0
    """Frames that came out of the decoder (or images visited in a folder)."""
    emitted: int = 0
    """Frames handed to the caller after resampling and start/end/max_frames."""
    skipped_corrupt: int = 0
    """Packets the decoder rejected plus frames it flagged as damaged or could not read."""
    skipped_out_of_order: int = 0
    """Frames dropped because their timestamp did not advance (duplicate/backward PTS)."""
    ended_early: bool = False
    """The stream stopped well before the duration its container declared (truncated?)."""
    warnings: list[str] = field(default_factory=list)
    """Human-readable warnings, first :data:`MAX_WARNINGS` verbatim."""
    suppressed_warnings: int = 0

    def warn(self, uri: str, message: str) -> None:
        """Record a recoverable problem: stats list, a VideoDecodeWarning and a DEBUG log line, capped."""
        if len(self.warnings) >= MAX_WARNINGS:
            self.suppressed_warnings += 1
            if self.suppressed_warnings == 1:
                note = f"{uri}: more than {MAX_WARNINGS} decode warnings; further ones are only counted"
                warnings.warn(note, VideoDecodeWarning, stacklevel=3)
                log.debug(note)
            return
        text = f"{uri}: {message}"
        self.warnings.append(text)
        warnings.warn(text, VideoDecodeWarning, stacklevel=3)
        # A Python warning already reaches the user; DEBUG keeps it out of stderr twice but
        # lets services that log at DEBUG keep a record.
        log.debug(text)
