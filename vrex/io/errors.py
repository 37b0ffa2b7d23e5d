"""Errors and warnings raised by the video-input layer."""

from __future__ import annotations


class VideoSourceError(Exception):
    """An input cannot be used as a video source.

    The message always starts with the input as the user gave it (path, URL or device),
    followed by what is wrong, e.g. ``"clip.mp4: no such file"``.
    """

    def __init__(self, uri: object, problem: str):
        self.uri = str(uri)
        self.problem = problem
        super().__init__(f"{self.uri}: {problem}")


class VideoDecodeWarning(RuntimeWarning):
    """Recoverable trouble while decoding (corrupt data skipped, missing timestamps, ...)."""
