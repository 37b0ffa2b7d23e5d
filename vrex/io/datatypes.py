"""Plain data types shared by the video sources."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from .errors import VideoDecodeWarning
from .events import SourceWarning, WarningKind

log = logging.getLogger("vrex.io")

SourceKind = Literal["file", "url", "webcam", "images", "videos"]

# Deferred RGB conversion of a decoded frame: ``loader(size)`` -> image (shorter side = size).
Loader = Callable[[int | None], Image.Image]

# Long damaged streams can produce thousands of events: keep the first ones of each kind verbatim
# and count the rest, so neither the terminal, ``stats.warnings`` nor a JSON consumer floods.
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
    declared_frames: int | None = None
    """Frames the container's index counts (MP4 sample table, AVI header); None where it does not say."""


@dataclass
class DecodeStats:
    """Counters and warnings for one pass over a source; reset each time the source is iterated."""

    uri: str = ""
    decoded: int = 0
    """Frames that came out of the decoder (or images visited in a folder)."""
    emitted: int = 0
    """Frames handed to the caller after resampling and start/end/max_frames."""
    skipped_corrupt: int = 0
    """Packets the decoder rejected plus frames it flagged as damaged or could not read."""
    skipped_out_of_order: int = 0
    """Frames dropped because their timestamp did not advance (duplicate/backward PTS)."""
    ended_early: bool = False
    """The stream stopped well before the duration its container declares (truncated?)."""
    lost: bool = False
    """A network source dropped and every reconnection attempt failed."""
    warnings: list[str] = field(default_factory=list)
    """Human-readable warnings, the first :data:`MAX_WARNINGS` of each kind verbatim."""
    records: list[SourceWarning] = field(default_factory=list)
    """The same as data, plus one summary record per kind for the occurrences past the cap."""
    counts: dict[str, int] = field(default_factory=dict)
    """Occurrences per warning kind."""
    suppressed_warnings: int = 0
    """Occurrences past the per-kind cap (counted, not listed until the summary)."""
    listener: Callable[[SourceWarning], None] | None = field(default=None, repr=False)
    """Called with each record as it is made (``VideoSource(on_warning=...)``)."""

    def warn(self, kind: WarningKind, message: str, t: float | None = None) -> None:
        """Record a recoverable problem: a record, a VideoDecodeWarning and a DEBUG log line, capped per kind."""
        total = self.counts[kind] = self.counts.get(kind, 0) + 1
        if total > MAX_WARNINGS:
            self.suppressed_warnings += 1
            if total == MAX_WARNINGS + 1:
                note = f"{self.uri}: more than {MAX_WARNINGS} warnings of kind {kind!r}; further ones are only counted"
                warnings.warn(note, VideoDecodeWarning, stacklevel=3)
                log.debug(note)
            return
        self._record(SourceWarning(self.uri, kind, message, 1, total, t))

    def finish(self) -> None:
        """End of the pass: one summary record per kind whose occurrences went past the cap."""
        for kind, total in self.counts.items():
            if total > MAX_WARNINGS:
                more = total - MAX_WARNINGS
                reason = f"{more} more warning(s) of kind {kind!r} not listed ({total} in all)"
                self._record(SourceWarning(self.uri, kind, reason, more, total), quiet=True)  # type: ignore[arg-type]

    def _record(self, record: SourceWarning, quiet: bool = False) -> None:
        self.records.append(record)
        if not quiet:
            self.warnings.append(str(record))
            warnings.warn(str(record), VideoDecodeWarning, stacklevel=4)
        # A Python warning already reaches the user; DEBUG keeps it out of stderr twice but
        # lets services that log at DEBUG keep a record.
        log.debug(str(record))
        if self.listener is not None:
            self.listener(record)
