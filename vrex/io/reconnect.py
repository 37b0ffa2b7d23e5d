"""How a network source comes back after it drops or stalls mid-stream."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reconnect:
    """Bounded reconnection with exponential backoff for network sources (http(s), rtsp, rtmp, ...).

    On a read error, a stall (no data for ``read_timeout`` seconds) or a connection closed before
    the declared end, the source re-opens after ``initial_delay`` seconds, doubling the wait up
    to ``max_delay``, at most ``attempts`` times in a row (a frame received resets the count).
    A file over HTTP resumes where it stopped (seek, then frames already emitted are skipped);
    a live stream just re-opens and its times continue from the wall-clock time lost. When every
    attempt fails the pass ends with a ``lost`` warning and ``SourceEnd.status == "lost"``.
    Failures before the first frame are not retried: the input is reported as unusable at once.
    """

    attempts: int = 5
    initial_delay: float = 0.5
    max_delay: float = 8.0
    read_timeout: float | None = None
    """Seconds without data that count as a stall; None: the source's ``timeout``."""

    def __post_init__(self) -> None:
        if self.attempts < 0:
            raise ValueError(f"reconnect attempts must be >= 0, got {self.attempts}")
        if self.initial_delay < 0 or self.max_delay < self.initial_delay:
            raise ValueError(f"need 0 <= initial_delay <= max_delay, got {self.initial_delay}, {self.max_delay}")
        if self.read_timeout is not None and self.read_timeout <= 0:
            raise ValueError(f"read_timeout must be positive, got {self.read_timeout}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt number ``attempt`` (1, 2, ...)."""
        return min(self.max_delay, self.initial_delay * 2 ** (attempt - 1))


#: No reconnection at all: the first read failure ends the pass (status ``lost``).
NEVER = Reconnect(attempts=0)
