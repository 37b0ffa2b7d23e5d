"""End to end in headless Chromium (Debian's package, driven by Playwright through executable_path):
the page opens, a fake camera plays a real shared clip, a narration appears, a typed question gets
an answer, and the timeline of what it read renders. Screenshots: tmp dir, or docs/figures when
VREX_SCREENSHOTS names a folder."""

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


def test_page_camera_narration_question_timeline(server, clip_path, tmp_path):
    need_browser()
    from playwright.sync_api import expect, sync_playwright

    y4m = make_y4m(clip_path, tmp_path / "camera.y4m")
    shots = Path(os.environ.get("VREX_SCREENSHOTS") or tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[*FLAGS, f"--use-file-for-fake-video-capture={y4m}"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            expect(page.locator("#status")).to_contain_text("ready", timeout=15_000)
            page.fill("#policy", "resv")  # a retrieval policy: the timeline shows a selection, not all 1s
            page.click("#start")
            narration = page.locator("#feed .narration").first
            expect(narration).to_be_visible(timeout=60_000)
            assert narration.inner_text().strip()
            expect(page.locator("#stats")).to_contain_text("cached tokens")
            # Let a few seconds of stream build up so the answer has a past to choose from.
            page.wait_for_function("Number((document.querySelector('#stats div:nth-child(7) b') || {}).textContent) >= 10", timeout=60_000)
            page.fill("#ask-input", "What do you see?")
            page.click("#ask-button")
            answer = page.locator("#feed .answer").first
            expect(answer).to_be_visible(timeout=60_000)
            assert len(answer.inner_text().strip()) > 5
            # The answer is selected and its timeline drawn: title, bars and thumbnails of the most-read frames.
            expect(page.locator("#tl-title")).to_contain_text("Q: What do you see?")
            expect(page.locator("#top-frames img").first).to_be_visible(timeout=10_000)
            page.wait_for_function("document.querySelector('#top-frames img').naturalWidth > 0")
            painted = page.evaluate("""() => { const c = document.getElementById('tl-canvas');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }""")
            assert painted > 500
            page.screenshot(path=str(shots / "serve.png"))
            page.check("#per-layer")
            expect(page.locator("#tl-title")).to_contain_text("Q: What do you see?")
            page.wait_for_timeout(500)
            page.locator("#timeline").screenshot(path=str(shots / "serve-layers.png"))
            assert not errors, errors
            page.click("#stop")
        finally:
            browser.close()
    assert (shots / "serve.png").stat().st_size > 10_000
