"""Limits of ``vrex serve`` and the client errors they raise (each becomes one clear 4xx answer)."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError


class ClientError(Exception):
    """A bad request from one client: answered with ``status`` and ``message``; nothing else is touched."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class ServeLimits:
    max_sessions: int = 4
    max_frame_bytes: int = 8 * 2**20
    max_frame_side: int = 4096  # pixels, either side of an incoming frame
    model_side: int = 448  # frames are scaled down to this longer side before queueing (the encoder uses 224)
    max_upload_bytes: int = 200 * 2**20
    max_fps: float = 4.0
    max_question_chars: int = 500
    idle_timeout_s: float = 600.0  # a session without input or clients for this long is closed
    max_session_frames: int = 14_400  # two hours at 2 fps, then the session ends (its cache would grow on)
    thumb_side: int = 128


def decode_frame(data: bytes, limits: ServeLimits) -> Image.Image:
    """Bytes of one JPEG/PNG/WebP/... frame -> RGB image scaled to ``model_side``; ClientError otherwise."""
    if len(data) > limits.max_frame_bytes:
        raise ClientError(413, f"frame of {len(data)} bytes exceeds the limit of {limits.max_frame_bytes} bytes")
    if not data:
        raise ClientError(422, "empty frame: send the bytes of one image (JPEG, PNG or WebP)")
    try:
        image = Image.open(io.BytesIO(data))
        w, h = image.size  # read from the header, before decoding pixels
        if max(w, h) > limits.max_frame_side:
            raise ClientError(413, f"frame of {w}x{h} pixels exceeds the limit of {limits.max_frame_side} pixels per side")
        image.draft("RGB", (limits.model_side, limits.model_side))  # JPEG: decode at reduced scale
        image = image.convert("RGB")
    except ClientError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ClientError(422, f"frame is not a readable image ({type(e).__name__}: {e})") from None
    if max(image.size) > limits.model_side:
        image.thumbnail((limits.model_side, limits.model_side))
    return image


def check_question(text: object, limits: ServeLimits) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ClientError(422, "question must be a non-empty string")
    if len(text) > limits.max_question_chars:
        raise ClientError(422, f"question of {len(text)} characters exceeds the limit of {limits.max_question_chars}")
    return text.strip()


def check_fps(fps: float, limits: ServeLimits) -> float:
    if not 0 < fps <= limits.max_fps:
        raise ClientError(422, f"fps must be in (0, {limits.max_fps}], got {fps}")
    return float(fps)
