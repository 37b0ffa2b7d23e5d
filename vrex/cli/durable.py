"""``vrex run --session DIR`` and clean stops: open or resume a durable session, skip the frames it
has seen, stop at a frame boundary on SIGINT/SIGTERM (``vrex.engine.durable`` does the saving)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any, Callable, Iterator

import typer

from vrex.cli.options import fail

#: Files a first save writes before its manifest: a directory holding only these never became a session.
UNFINISHED_FIRST_SAVE = {"checkpoint.bin", "checkpoint.bin.tmp", "log.bin", "manifest.json.tmp"}


def open_session(directory: Path | None, model, policy, config, settings: dict[str, Any], trace) -> tuple[Any, bool]:
    """``(session, resumed)``: the saved session in ``directory`` (checked against these settings), or
    a new one saved there at once (so a crash from the first frame on can resume)."""
    from vrex.engine.durable import is_session_dir
    from vrex.engine.persist import SessionError, SessionSaveError
    from vrex.engine.session import StreamingSession

    if directory is not None and is_session_dir(directory):
        try:
            return StreamingSession.load(directory, model, policy=policy, config=config, settings=settings, trace=trace), True
        except SessionError as e:
            fail(f"--session: {e}")
    session = StreamingSession(model, policy, config, trace=trace)
    if directory is not None:
        if directory.is_dir():  # a first save that never finished: nothing durable, start over
            for p in directory.iterdir():
                if p.name in UNFINISHED_FIRST_SAVE:
                    p.unlink()
        try:
            session.save(directory, settings)
        except (SessionSaveError, SessionError) as e:
            fail(f"--session: {e}")
    return session, False


def skip_seen(frames: Iterator[tuple[float, Any]], session, skipping: list[bool]) -> Iterator[tuple[float, Any]]:
    """The source's frames after the ``session.frames`` it has already seen; the last one seen must
    be at the saved time (else the source is not the one the session watched). ``skipping[0]`` is
    True while frames are skipped (source warnings about them were already reported)."""
    seen, last_t = 0, None
    skipping[0] = session.frames > 0
    while seen < session.frames:
        try:
            last_t, _ = next(frames)
        except StopIteration:
            fail(f"--session: the source ends after {seen} frames, but the session has seen {session.frames}")
        seen += 1
    skipping[0] = False
    if last_t is not None and abs(last_t - session.t) > 1e-6:
        fail(f"--session: the source's frame {seen - 1} is at {last_t:g} s, but the saved session's last frame was at "
             f"{session.t:g} s (another source, or other --fps/--max-frames?)")
    yield from frames


def resume_event(session, directory: Path) -> dict[str, Any]:
    return {"kind": "resume", "t": round(session.t, 3), "frame": session.frames, "cached_tokens": session.cached_tokens,
            "session": str(directory)}


class StopSignals:
    """SIGINT and SIGTERM ask the run to stop at the next frame boundary (events kept, session and
    trace flushed, summary printed); a second signal stops at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


def report_stop(stop: StopSignals, session, directory: Path | None, as_json: bool, echo_err: Callable[[str], None]) -> None:
    """The summary of a run stopped by a signal, then exit 128 + signal number (the shell convention)."""
    saved = session.saved_frames if session is not None else None
    frames = session.frames if session is not None else 0
    t = session.t if session is not None else 0.0
    if as_json:
        print(json.dumps({"kind": "stopped", "signal": stop.name, "t": round(t, 3), "frames": frames,
                          "saved_frames": saved, "session": None if directory is None else str(directory)}), flush=True)
    where = f"; session saved in {directory} at frame {saved} (run the same command to resume)" if directory is not None else ""
    echo_err(f"vrex run: stopped by {stop.name} after {frames} frames (t={t:g} s){where}")
    raise typer.Exit(128 + int(stop.signum or 0))


__all__ = ["open_session", "skip_seen", "resume_event", "StopSignals", "report_stop"]
