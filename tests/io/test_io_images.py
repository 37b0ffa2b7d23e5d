"""A folder of photos played as a stream."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from vrex.io import VideoDecodeWarning, open_source
from vrex.io.resample import scaled_size


def _like(frame_image: Image.Image, src) -> float:
    """Mean absolute pixel difference between a frame and a source photo at the frame's size."""
    with Image.open(src) as im:
        ref = im.convert("RGB").resize(frame_image.size)
    return float(np.abs(np.asarray(frame_image, float) - np.asarray(ref, float)).mean())


def test_folder_plays_in_natural_name_order(photo_dir, image_paths):
    with open_source(photo_dir, fps=2, size=48) as src:
        frames = list(src)
    assert [f.t for f in frames] == [0.0, 0.5, 1.0, 1.5]
    info = src.info
    assert (info.kind, info.native_fps, info.duration) == ("images", 2.0, 2.0)
    # img_1, img_2, img_10, img_11 were copied from the first four photos in that order.
    for frame, photo in zip(frames, image_paths[:4]):
        with Image.open(photo) as im:
            assert frame.image.size == scaled_size(im.width, im.height, 48)
        others = [p for p in image_paths[:4] if p != photo]
        assert _like(frame.image, photo) < min(_like(frame.image, o) for o in others)


def test_per_image_duration_without_duplicates(photo_dir):
    with open_source(photo_dir, fps=2, size=16, image_duration=1.5) as src:
        assert [f.t for f in src] == [0.0, 1.5, 3.0, 4.5]
    assert src.info.duration == 6.0


def test_short_image_duration_is_resampled(tmp_path, image_paths):
    for i, p in enumerate(image_paths[:6]):
        shutil.copy(p, tmp_path / f"{i:02d}{p.suffix}")
    with open_source(tmp_path, fps=1, size=16, image_duration=0.5) as src:
        assert [f.t for f in src] == [0.0, 1.0, 2.0]
    assert src.stats.decoded == 3  # the skipped stills were never decoded


def test_unreadable_image_is_skipped_and_counted(photo_dir):
    (photo_dir / "img_3.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.warns(VideoDecodeWarning, match="img_3.jpg"):
        with open_source(photo_dir, fps=2, size=16) as src:
            ts = [f.t for f in src]
    assert ts == [0.0, 0.5, 1.5, 2.0]  # slot 1.0 s belonged to the broken picture
    assert src.stats.skipped_corrupt == 1 and src.stats.emitted == 4
