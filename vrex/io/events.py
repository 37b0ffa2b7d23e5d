"""Warnings and the end of a pass as data, for consumers that cannot read stderr (``--json``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

WarningKind = Literal[
    "corrupt",  # damaged container data, undecodable packets, frames the decoder flags, unreadable images
    "out_of_order",  # a frame dropped because its time does not advance
    "gap",  # no frames for a while (data lost, or a pause in a variable-rate stream)
    "timestamps",  # frames without timestamps, timed by counting
    "seek",  # seeking to the start time failed; decoding from the beginning
    "too_large",  # an image of a folder skipped because it exceeds max_frame_pixels
    "truncated",  # the input ended before its declared duration, or was unreadable to the end
    "reconnect",  # a network source dropped or stalled; reconnecting, or resumed
    "lost",  # a network source gave up after its reconnection attempts
]

EndStatus = Literal["complete", "stopped", "truncated", "lost", "failed"]


@dataclass(frozen=True)
class SourceWarning:
    """One recoverable problem of a pass, or a summary of several of the same kind.

    ``count`` is how many occurrences this record stands for: 1, except for the summary records
    written at the end of a pass for occurrences past the per-kind cap; ``total`` is how many of
    this kind the pass had seen when the record was made. ``t`` is the stream time in seconds
    (as in ``Frame.t``) where it happened, when known.
    """

    uri: str
    kind: WarningKind
    reason: str
    count: int = 1
    total: int = 1
    t: float | None = None

    def __str__(self) -> str:
        return f"{self.uri}: {self.reason}"

    def to_event(self) -> dict[str, Any]:
        """JSON-ready ``{"kind": "warning", "warning": <kind>, "count", "total", "reason", "t", "source"}``."""
        return {"kind": "warning", "warning": self.kind, "count": self.count, "total": self.total,
                "reason": self.reason, "t": _round(self.t), "source": self.uri}


@dataclass(frozen=True)
class SourceEnd:
    """How a pass over a source ended.

    ``status``: ``complete`` (the input ran out normally), ``stopped`` (``end``/``max_frames``
    reached, or the consumer stopped reading), ``truncated`` (the input ended before its declared
    duration, or was unreadable to its end), ``lost`` (a network source gave up reconnecting),
    ``failed`` (the pass raised :class:`VideoSourceError`; ``reason`` is its message).
    """

    uri: str
    status: EndStatus
    reason: str
    t: float | None
    """Time of the last emitted frame (None if none was)."""
    frames: int
    """Frames emitted."""
    warnings: dict[str, int] = field(default_factory=dict)
    """Occurrences per warning kind over the pass."""

    def to_event(self) -> dict[str, Any]:
        """JSON-ready ``{"kind": "source_end", "status", "reason", "t", "frames", "warnings", "source"}``."""
        return {"kind": "source_end", "status": self.status, "reason": self.reason, "t": _round(self.t),
                "frames": self.frames, "warnings": dict(self.warnings), "source": self.uri}


def _round(t: float | None) -> float | None:
    return None if t is None else round(t, 6)
