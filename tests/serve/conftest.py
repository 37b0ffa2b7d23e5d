"""Fixtures for the server tests: the real default model, real frames of a shared clip, a real server."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from serve_helpers import start

from vrex.io import assets_dir, open_source

CLIP = "videos/cockatoo.mp4"


def need_assets() -> Path:
    root = assets_dir()
    if root is None:
        if os.environ.get("CI") == "true":
            raise RuntimeError("shared test media not found: set VREX_ASSETS to the assets folder")
        pytest.skip("shared test media not found (set VREX_ASSETS to the assets folder)")
    return Path(root)


@pytest.fixture(scope="session")
def model():
    from vrex.models.videollm import load_videollm

    return load_videollm()  # the shipped default: it narrates and names subjects


@pytest.fixture(scope="session")
def clip_path() -> Path:
    return need_assets() / CLIP


@pytest.fixture(scope="session")
def jpegs(clip_path) -> list[bytes]:
    """The first 10 s of a real clip at 2 fps, as the JPEG frames a webcam page would send."""
    out = []
    with open_source(clip_path, fps=2, max_frames=20, size=240) as src:
        for frame in src:
            buf = io.BytesIO()
            frame.image.save(buf, "JPEG", quality=85)
            out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def server(model):
    running = start(model, media_dir=need_assets() / "videos")
    yield running
    running.stop()
