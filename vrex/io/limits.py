"""One limit on the size of a decoded frame, for every kind of source.

A 600 kB PNG can declare 20000x10000 pixels; decoding it to RGB takes gigabytes. Every source
path reads the size from a header first and refuses before anything is decoded: image files
(single or in a folder) through PIL's format plugins, which read only the header; videos and
streams through the stream's codec parameters, with FFmpeg's own ``max_pixels`` guard on the
probing decode that ``av.open`` runs. Each decoded frame is checked again (a stream may change
size mid-way).
"""

from __future__ import annotations

import struct
from pathlib import Path

from PIL import Image

from .errors import VideoSourceError

#: Largest frame decoded by default: 64 megapixels (8192x8192; 8K UHD video is 33 Mpx), about
#: 200 MB as RGB. Override per source with ``open_source(..., max_frame_pixels=N)``.
MAX_FRAME_PIXELS = 8192 * 8192


def too_large(width: int, height: int, limit: int) -> str | None:
    """Why a ``width`` x ``height`` frame is refused under ``limit`` pixels, or None if it fits."""
    if width * height <= limit:
        return None
    return (f"frame size {width}x{height} ({width * height / 1e6:.1f} megapixels) exceeds the limit of "
            f"{limit / 1e6:.1f} megapixels (raise it with max_frame_pixels)")


def check_frame_size(uri: str, width: int | None, height: int | None, limit: int) -> None:
    """Raise :class:`VideoSourceError` naming ``uri`` and the size if the frame is over ``limit``."""
    if width and height:
        why = too_large(width, height, limit)
        if why:
            raise VideoSourceError(uri, why)


def check_limit(limit: int) -> int:
    """Validate a caller's ``max_frame_pixels``."""
    if not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"max_frame_pixels must be a positive number of pixels, got {limit!r}")
    return limit


def image_header_size(path: str | Path) -> tuple[int, int] | None:
    """``(width, height)`` from the header of an image file PIL knows, else None; decodes nothing.

    This is ``Image.open`` without its decompression-bomb refusal: PIL raises on images over
    twice ``Image.MAX_IMAGE_PIXELS`` before saying their size, and our own limit must name it.
    """
    Image.init()
    named = Image.EXTENSION.get(Path(path).suffix.lower())
    try:
        with open(path, "rb") as fp:
            prefix = fp.read(16)
            for fmt in Image.ID:
                factory, accept = Image.OPEN[fmt]
                if accept is None and fmt != named:
                    continue  # no magic number (TGA, ...): only when the file is named so
                try:
                    # accept() is True, False or a message saying why the format does not fit.
                    if accept is None or accept(prefix) is True:
                        fp.seek(0)
                        return factory(fp, str(path)).size  # the plugin reads the header only
                except (SyntaxError, IndexError, TypeError, ValueError, OSError, struct.error):
                    pass  # what PIL's own Image.open skips too
                except Image.DecompressionBombError:
                    # a damaged header (fuzzing: a GIF's first block zeroed) can declare a frame past PIL's
                    # own limit: no usable size here; the decoder's stream header is checked next
                    return None
    except OSError:
        return None
    return None
