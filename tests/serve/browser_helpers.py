"""Headless Chromium for the page tests: Debian's package driven by Playwright through
executable_path (no browser download), with a fake camera that plays a real shared clip."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import av
import pytest

CHROMIUM = os.environ.get("VREX_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]


def need_browser():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "the playwright package"
    else:
        missing = None if shutil.which(CHROMIUM) or Path(CHROMIUM).exists() else f"Chromium at {CHROMIUM}"
    if missing:
        if os.environ.get("CI") == "true":
            raise RuntimeError(f"{missing} not installed: run `make setup` (scripts/setup-browser.sh)")
        pytest.skip(f"{missing} not installed (make setup installs it)")


def make_y4m(clip: Path, out: Path, seconds: float = 8.0, size: tuple[int, int] = (320, 240), fps: int = 10) -> Path:
    """A Y4M of the clip's first seconds (Chromium's fake camera reads Y4M and loops it)."""
    with av.open(str(clip)) as src, av.open(str(out), "w", format="yuv4mpegpipe") as dst:
        stream = dst.add_stream("rawvideo", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        step, next_t, n = 1.0 / fps, 0.0, 0
        for frame in src.decode(video=0):
            t = float(frame.pts * frame.time_base) if frame.pts is not None else n * step
            if t > seconds:
                break
            while next_t <= t and next_t <= seconds:
                out_frame = frame.reformat(width=size[0], height=size[1], format="yuv420p")
                out_frame.pts = None
                for packet in stream.encode(out_frame):
                    dst.mux(packet)
                next_t, n = next_t + step, n + 1
        for packet in stream.encode():
            dst.mux(packet)
    return out


def launch(playwright, y4m: Path):
    """Chromium whose fake camera loops ``y4m`` (from ``make_y4m``)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[*FLAGS, f"--use-file-for-fake-video-capture={y4m}"])
