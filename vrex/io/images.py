"""A folder of still images played as a video stream."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .datatypes import DecodeStats, Loader, SourceInfo
from .errors import VideoSourceError
from .limits import MAX_FRAME_PIXELS, image_header_size, too_large
from .resample import scaled_size

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})

# Everything PIL may raise on a damaged or mislabelled file.
_READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


class UnreadableImage(Exception):
    """An image in the folder could not be decoded (the stream skips it)."""


class FrameTooLarge(UnreadableImage):
    """An image in the folder is larger than the pixel limit (the stream skips it, undecoded)."""


def natural_key(path: Path) -> list[object]:
    # frame_2.png sorts before frame_10.png, as people number their stills.
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (other files are ignored), in natural name order."""
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(files, key=natural_key)


def load_image(path: Path, size: int | None, max_pixels: int = MAX_FRAME_PIXELS) -> Image.Image:
    """Read ``path`` as upright RGB, its shorter side scaled to ``size`` if given.

    The size is checked on the header before the pixels are decoded; an image over
    ``max_pixels`` raises :class:`FrameTooLarge` naming the file and its size.
    """
    dims = image_header_size(path)
    why = too_large(*dims, max_pixels) if dims else None
    if why:
        raise FrameTooLarge(f"{path.name}: {why}")
    try:
        with Image.open(path) as im:
            if size is not None:
                # JPEG can decode directly at 1/2, 1/4, 1/8 scale: much less work for big photos.
                im.draft("RGB", (size, size))
            im = ImageOps.exif_transpose(im).convert("RGB")
    except _READ_ERRORS as e:
        raise UnreadableImage(f"{path.name}: {e}") from e
    width, height = scaled_size(im.width, im.height, size)
    if (width, height) != im.size:
        im = im.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return im


class ImageFolder:
    """Each image is one frame shown for ``duration`` seconds: image i has ``t = i * duration``."""

    def __init__(self, uri: str, folder: Path, duration: float, max_pixels: int = MAX_FRAME_PIXELS):
        if duration <= 0:
            raise ValueError(f"image_duration must be positive, got {duration}")
        self.uri, self.duration, self.max_pixels = uri, duration, max_pixels
        self.paths = list_images(folder)
        if not self.paths:
            raise VideoSourceError(uri, f"folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        # The header only; a bad first image is reported when the stream reaches it.
        width, height = image_header_size(self.paths[0]) or (None, None)
        self.info = SourceInfo(uri, "images", width, height, 1.0 / duration, len(self.paths) * duration, None)

    def frames(self, stats: DecodeStats, start: float = 0.0) -> Iterator[tuple[float, Loader]]:
        """Yield ``(t, loader)``; images are only read when the resampler keeps them."""
        for i, path in enumerate(self.paths):
            yield i * self.duration, self._loader(path, stats)

    def _loader(self, path: Path, stats: DecodeStats) -> Loader:
        def load(size: int | None) -> Image.Image:
            image = load_image(path, size, self.max_pixels)
            stats.decoded += 1
            return image

        return load

    def close(self) -> None:
        """Nothing to release: files are opened and closed per image."""
