"""Video input: files, network streams, webcams and image folders as timestamped RGB frames.

>>> from vrex.io import open_source
>>> with open_source("clip.mp4", fps=2, size=336) as src:   # doctest: +SKIP
...     for frame in src:
...         print(frame.index, round(frame.t, 2), frame.image.size)
...     print(src.stats.skipped_corrupt, src.stats.warnings, src.end_of_stream.status)

Behaviour in short (details in :class:`VideoSource` and :class:`Resampler`):

* ``Frame.t`` is the frame's real presentation time (PTS x time base) in seconds from the
  stream's first frame; frames without PTS are timed by counting at the declared rate (warned).
  Frames come in the decoder's (presentation) order; timestamps the container attaches out of
  order (AVI with packed B-frames) are put back in order, so no valid frame is dropped.
* Resampling emits the first frame at or after each target ``0, 1/fps, 2/fps, ...``; a source
  slower than ``fps`` is not padded with duplicates. ``fps=None``/``0`` keeps every frame.
* Only the video stream is decoded (a broken audio track is irrelevant).
* Damaged data mid-stream is skipped, counted in ``stats.skipped_corrupt`` and reported with a
  :class:`VideoDecodeWarning`; the stream goes on. Inputs that cannot be used at all raise
  :class:`VideoSourceError` whose message starts with the input's name.
* Every warning is also data: :class:`SourceWarning` records in ``stats.records`` and passed to
  ``on_warning``; after a pass ``end_of_stream`` (:class:`SourceEnd`) says complete, stopped, truncated,
  lost or failed.
* Network sources that drop or stall mid-stream reconnect with backoff (:class:`Reconnect`).
* Frames over ``max_frame_pixels`` (:data:`MAX_FRAME_PIXELS`) are refused from the header,
  before decoding, on every source path.
* A single still image file is accepted as a one-frame stream; a folder of images is a stream
  with one image per ``image_duration`` (default ``1/fps``) seconds, in natural name order.
"""

from .clips import assets_dir, list_demo_clips
from .datatypes import DecodeStats, Frame, SourceInfo
from .errors import VideoDecodeWarning, VideoSourceError
from .events import SourceEnd, SourceWarning
from .limits import MAX_FRAME_PIXELS
from .reconnect import Reconnect
from .resample import Resampler
from .source import VideoSource, open_source

__all__ = [
    "MAX_FRAME_PIXELS",
    "DecodeStats",
    "Frame",
    "Reconnect",
    "Resampler",
    "SourceEnd",
    "SourceInfo",
    "SourceWarning",
    "VideoDecodeWarning",
    "VideoSource",
    "VideoSourceError",
    "assets_dir",
    "list_demo_clips",
    "open_source",
]
