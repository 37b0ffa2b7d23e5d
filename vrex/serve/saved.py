"""Served sessions kept on disk (``vrex serve --sessions-dir DIR``): one durable session per stream.

``DIR/<session id>/`` holds the session in the format of ``vrex run --session`` (``vrex.engine.durable``:
checkpoint, append-only log, manifest; the serve settings ride in the manifest's run settings) plus
``serve.jsonl``, what only the server knows, appended one line per step *before* the session's own
save: each processed frame's time and thumbnail (the timeline and thumbnails of a resumed stream
cover its whole past), the counters, and the event numbers handed out. A crash between the two
writes leaves a line for a frame the session does not hold: ignored on resume (the session's
manifest decides where the stream is). A line cut short by a crash is cut off before appending.

Event numbers (``seq``) must keep increasing across a restart, or a client polling ``after=N`` would
miss the resumed events: they are reserved in blocks (``SEQ_BLOCK``), each block written here before
it is used, and a resumed session continues after the last reserved block.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

from vrex.engine.durable import is_session_dir, open_manifest
from vrex.serve.limits import ClientError

SIDECAR = "serve.jsonl"
SEQ_BLOCK = 1000
_ID = re.compile(r"[0-9a-f]{12}")  # LiveSession ids: uuid4().hex[:12]; nothing else names a directory


class SessionsDir:
    """The operator's ``--sessions-dir``: where served sessions are saved and found again."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sid: str) -> Path:
        if not _ID.fullmatch(sid):
            raise ClientError(404, f"no session {sid!r}")  # never a path: ids are 12 hex digits
        return self.root / sid

    def has(self, sid: str) -> bool:
        return bool(_ID.fullmatch(sid)) and is_session_dir(self.root / sid)

    def saved(self) -> list[dict[str, Any]]:
        """Every saved session: id, frames, stream time, cached tokens, settings (from its manifest)."""
        out = []
        for p in sorted(self.root.iterdir()):
            if not (_ID.fullmatch(p.name) and is_session_dir(p)):
                continue
            try:
                m = open_manifest(p)
            except ValueError:
                continue  # a damaged directory: resuming it gives the error
            out.append({"id": p.name, "state": "saved", "frames": m["frames"], "t": round(m["t"], 3),
                        "cached_tokens": m["cached_tokens"], "settings": m["settings"]["run"].get("serve"),
                        "saved_at": m["saved_at"]})
        return out

    def remove(self, sid: str) -> None:
        shutil.rmtree(self.path(sid), ignore_errors=True)


class Sidecar:
    """``serve.jsonl`` of one session (see the module docstring)."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / SIDECAR
        self._lock = threading.Lock()  # the worker (steps) and client threads (seq blocks) both append
        self._f = None
        self.seq_limit = 0  # event numbers up to here are reserved on disk

    def read(self) -> list[dict[str, Any]]:
        """The complete lines; a torn last line (a crash mid-write) is cut off the file."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)
        lines = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
        self.seq_limit = max((int(x["seq_limit"]) for x in lines if "seq_limit" in x), default=0)
        return lines

    def append(self, record: dict[str, Any]) -> None:
        """One line, flushed and fsynced (it must be on disk before the session's save that follows)."""
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._f is None:
                self._f = open(self.path, "ab", buffering=0)
            self._f.write(data)
            os.fsync(self._f.fileno())

    def reserve(self, seq: int) -> None:
        """Make sure event number ``seq`` is reserved on disk (one write per ``SEQ_BLOCK`` events)."""
        if seq > self.seq_limit:
            limit = (seq // SEQ_BLOCK + 1) * SEQ_BLOCK
            self.append({"seq_limit": limit})
            self.seq_limit = limit

    def close(self) -> None:
        with self._lock:
            if self._f is not None:
                self._f.close()
                self._f = None


def frame_line(fid: int, t: float, thumb: bytes, counts: dict[str, int]) -> dict[str, Any]:
    return {"frame": fid, "t": t, "thumb": base64.b64encode(thumb).decode(), "counts": counts}


def replay_frames(lines: list[dict[str, Any]], frames: int, last_t: float | None = None
                  ) -> tuple[list[float], dict[int, bytes], dict[str, int]]:
    """Frame times, thumbnails and the last counters of the first ``frames`` frames (the session's saved
    ones). ``last_t``: the session's last frame time, for a last frame with no line (``--cluster``: the
    actor saves its step before the server hears of it; a server that stopped in between wrote none)."""
    times: list[float] = []
    thumbs: dict[int, bytes] = {}
    counts: dict[str, int] = {}
    for x in lines:
        if "frame" in x and x["frame"] < frames:
            if x["frame"] == len(times):
                times.append(float(x["t"]))
            thumbs[x["frame"]] = base64.b64decode(x["thumb"])
            counts = x["counts"]
    if last_t is not None and len(times) == frames - 1:
        times.append(float(last_t))
    if len(times) != frames:
        raise ValueError(f"{SIDECAR} holds {len(times)} frame times, the session {frames} frames")
    return times, thumbs, counts


def saved_dialogue(directory: Path) -> list[dict[str, Any]]:
    """What the session saved in ``directory`` said (narrations, answers), read from its files without
    the model: for a session loaded on a Ray actor (``--cluster``), whose dialogue stays there."""
    from vrex.engine.persist import CHECKPOINT, LOG, read_records

    manifest = open_manifest(directory)
    (checkpoint,) = read_records(Path(directory) / CHECKPOINT, manifest["checkpoint"]["bytes"])
    said = list(checkpoint["state"]["dialogue"])
    for record in read_records(Path(directory) / LOG, manifest["log"]["bytes"]):
        said += record["dialogue"]
    return said


__all__ = ["SessionsDir", "Sidecar", "SIDECAR", "SEQ_BLOCK", "frame_line", "replay_frames", "saved_dialogue"]
