"""End to end in headless Chromium (Debian's package, driven by Playwright through executable_path):
the page opens, a fake camera plays a real shared clip, a narration appears, a typed question gets
an answer, and the timeline of what it read renders. Screenshots: tmp dir, or docs/figures when
VREX_SCREENSHOTS names a folder."""

from __future__ import annotations

import os
from pathlib import Path

from browser_helpers import CHROMIUM, FLAGS, make_y4m, need_browser


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
