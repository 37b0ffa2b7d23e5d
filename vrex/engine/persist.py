"""On-disk format of a durable session: records with checksums, an append-only log, an atomic manifest.

A session directory holds three files:

* ``checkpoint.bin``: one record, the whole session state at the moment it was first saved
  (written once; for ``vrex run --session`` that is right after the system prompt, so it is small).
* ``log.bin``: append-only records, one per ``save()``: the K/V blocks appended since the previous
  save (per layer, in the policy's cluster-contiguous order, with that order) and the small stream
  state after them. Never rewritten: a save costs what the frame added.
* ``manifest.json``: settings, and how many bytes of ``log.bin`` are durable, written atomically
  (write a temporary file, fsync, rename, fsync the directory) *after* the log bytes are fsynced.
  Bytes past the manifest's length are a save that a crash interrupted: ignored, then overwritten.

A record is ``MAGIC | u64 payload length | u32 crc32(payload) | payload``; the payload is a JSON
header (the object with every tensor replaced by a reference) followed by the raw tensor bytes.
No pickle: loading a damaged or foreign directory can fail, but cannot run code.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

FORMAT = "vrex.session/1"
MAGIC = b"VRXR"
_HEAD = struct.Struct("<4sQI")
MANIFEST, CHECKPOINT, LOG = "manifest.json", "checkpoint.bin", "log.bin"


class SessionError(ValueError):
    """A session directory cannot be used; the message names the directory and what is wrong."""


class SessionDamagedError(SessionError):
    """Missing, partial or corrupted files (checksum or structure)."""


class SessionMismatchError(SessionError):
    """The directory holds a session of another model, policy or settings."""


class SessionSaveError(OSError):
    """Writing the session failed (disk full, I/O error); the directory still holds the last good save."""


# -- test hooks -------------------------------------------------------------------------------
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """``VREX_CRASH_AT=name:N`` kills this process with SIGKILL at the N-th time ``name`` is reached
    (1-based): how the crash tests choose "during a frame's prefill", "during an answer", "during a
    save" without mocking anything. Unset (always, outside tests): one dictionary lookup."""
    spec = os.environ.get("VREX_CRASH_AT")
    if not spec:
        return
    want, _, count = spec.partition(":")
    if want != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


# -- encoding ---------------------------------------------------------------------------------
def encode(obj: Any) -> bytes:
    """A nested object of dicts (str keys), lists, tuples (read back as lists), str, int, float, bool,
    None and CPU tensors -> one payload."""
    blobs: list[bytes] = []
    specs: list[dict] = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            specs.append({"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "nbytes": len(raw)})
            blobs.append(raw)
            return {"__tensor__": len(specs) - 1}
        if isinstance(x, dict):
            return {str(k): walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        if x is None or isinstance(x, (str, int, float, bool)):
            return x
        raise TypeError(f"cannot persist a {type(x).__name__}")

    head = json.dumps({"obj": walk(obj), "tensors": specs}).encode()
    return struct.pack("<I", len(head)) + head + b"".join(blobs)


def decode(payload: bytes) -> Any:
    (n,) = struct.unpack_from("<I", payload)
    head = json.loads(payload[4 : 4 + n])
    tensors, off = [], 4 + n
    for spec in head["tensors"]:
        dtype = getattr(torch, spec["dtype"])
        raw = payload[off : off + spec["nbytes"]]
        off += spec["nbytes"]
        if spec["nbytes"]:
            t = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()).view(dtype).reshape(spec["shape"])
        else:
            t = torch.zeros(spec["shape"], dtype=dtype)
        tensors.append(t)

    def walk(x):
        if isinstance(x, dict):
            if set(x) == {"__tensor__"}:
                return tensors[x["__tensor__"]]
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(head["obj"])


def frame_record(payload: bytes) -> bytes:
    return _HEAD.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def read_records(path: Path, length: int) -> list[Any]:
    """Decode every record in the first ``length`` bytes of ``path``; damage raises SessionDamagedError."""
    try:
        with open(path, "rb") as f:
            data = f.read(length)
    except OSError as e:
        raise SessionDamagedError(f"session file '{path}' cannot be read: {e.strerror or e}") from e
    if len(data) < length:
        raise SessionDamagedError(f"session file '{path}' is shorter ({len(data)} bytes) than its manifest says ({length})")
    out, off = [], 0
    while off < length:
        if length - off < _HEAD.size:
            raise SessionDamagedError(f"session file '{path}': a record header at byte {off} is cut short")
        magic, n, crc = _HEAD.unpack_from(data, off)
        body = data[off + _HEAD.size : off + _HEAD.size + n]
        if magic != MAGIC or len(body) != n:
            raise SessionDamagedError(f"session file '{path}': record {len(out)} at byte {off} is damaged (bad header)")
        if zlib.crc32(body) != crc:
            raise SessionDamagedError(f"session file '{path}': record {len(out)} at byte {off} fails its checksum")
        try:
            out.append(decode(body))
        except (ValueError, KeyError, TypeError, struct.error) as e:
            raise SessionDamagedError(f"session file '{path}': record {len(out)} cannot be decoded ({e})") from e
        off += _HEAD.size + n
    return out


# -- atomic writes ----------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_error(directory: Path, what: str, e: OSError) -> SessionSaveError:
    why = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
    return SessionSaveError(e.errno, f"session '{directory}': saving {what} failed ({why}); the directory still holds the last good save")


def write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, rename over ``path``, fsync the directory: a reader sees the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class LogAppender:
    """``log.bin`` opened once; each append first cuts off bytes a failed or interrupted save left."""

    def __init__(self, path: Path, committed: int):
        self.path, self.committed = path, committed
        self._f: BinaryIO | None = None

    def append(self, record: bytes) -> int:
        """Append one framed record durably; returns the new committed length (not yet in the manifest)."""
        if self._f is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            self._f = os.fdopen(fd, "r+b", buffering=0)
        f = self._f
        f.truncate(self.committed)
        f.seek(self.committed)
        half = len(record) // 2
        f.write(record[:half])
        crash_point("save")  # tests: a kill in the middle of a record
        f.write(record[half:])
        os.fsync(f.fileno())
        return self.committed + len(record)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise SessionDamagedError(f"session '{directory}': no {MANIFEST} (not a saved vrex session, or its first save never finished)") from e
    except (OSError, ValueError) as e:
        raise SessionDamagedError(f"session '{directory}': {MANIFEST} is unreadable ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SessionDamagedError(f"session '{directory}': {MANIFEST} is not a {FORMAT} manifest")
    crc = manifest.pop("crc32", None)
    if crc != zlib.crc32(json.dumps(manifest, sort_keys=True).encode()):
        raise SessionDamagedError(f"session '{directory}': {MANIFEST} fails its checksum")
    return manifest


def write_manifest(directory: Path, manifest: dict) -> None:
    body = {k: v for k, v in manifest.items() if k != "crc32"}
    body["crc32"] = zlib.crc32(json.dumps(body, sort_keys=True).encode())
    write_atomic(directory / MANIFEST, json.dumps(body, sort_keys=True, indent=1).encode())


def file_crc(path: Path, length: int) -> int:
    with open(path, "rb") as f:
        return zlib.crc32(f.read(length))


__all__ = [
    "FORMAT", "SessionError", "SessionDamagedError", "SessionMismatchError", "SessionSaveError", "crash_point",
    "encode", "decode", "frame_record", "read_records", "write_atomic", "LogAppender", "read_manifest",
    "write_manifest", "save_error", "MANIFEST", "CHECKPOINT", "LOG",
]
