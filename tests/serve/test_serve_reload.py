"""The page comes back: a reload (or the tab closed and opened again) shows the same session again,
live on the same server or resumed from ``--sessions-dir`` by a restarted one, and a session that is
gone is said to be gone. Headless Chromium, a fake camera playing a real shared clip, the real model."""

from __future__ import annotations

import re
import time

from browser_helpers import launch, make_y4m, need_browser
from serve_helpers import start

FIRST, SECOND = "What do you see?", "What is the bird doing?"
STARTED = re.compile(r"session [0-9a-f]{12} · ")  # the status line of a running session
SAID = "#feed .narration .text, #feed .answer .text"  # what the model said, newest first


def _processed(server, sid: str) -> int:
    return server.hub.sessions[sid].counters.processed


def _wait(pred, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _sid(page) -> str:
    return page.evaluate("new URLSearchParams(location.hash.slice(1)).get('session')")


def _start_and_answer(page, server, expect) -> tuple[str, str]:
    """Start a camera session, let a few frames in, ask FIRST: (session id, answer text)."""
    page.goto(server.url + "/")
    expect(page.locator("#status")).to_contain_text("ready", timeout=15_000)
    page.click("#start")
    expect(page.locator("#status")).to_contain_text(STARTED, timeout=15_000)
    sid = _sid(page)
    assert sid and sid in server.hub.sessions
    _wait(lambda: _processed(server, sid) >= 3, what="3 frames processed")
    page.fill("#ask-input", FIRST)
    page.click("#ask-button")
    expect(page.locator("#feed .answer")).to_have_count(1, timeout=60_000)
    return sid, page.locator("#feed .answer .text").first.inner_text()


def _keeps_answering(page, server, sid: str, expect) -> None:
    """The stream goes on (the camera restarted) and a new question gets an answer with its timeline."""
    seen = _processed(server, sid)
    _wait(lambda: _processed(server, sid) >= seen + 2, what="frames after coming back")
    page.fill("#ask-input", SECOND)
    page.click("#ask-button")
    expect(page.locator("#tl-title")).to_contain_text("Q: " + SECOND, timeout=60_000)
    expect(page.locator("#top-frames img").first).to_be_visible(timeout=10_000)


def test_reload_reattaches_to_the_live_session(server, clip_path, tmp_path):
    need_browser()
    from playwright.sync_api import expect, sync_playwright

    y4m = make_y4m(clip_path, tmp_path / "camera.y4m", seconds=4.0)
    with sync_playwright() as p:
        browser = launch(p, y4m)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            sid, answer = _start_and_answer(page, server, expect)
            said = page.locator(SAID).all_inner_texts()  # newest first
            sessions = set(server.hub.sessions)
            page.reload()
            expect(page.locator("#status")).to_contain_text(f"session {sid} · ", timeout=15_000)
            assert _sid(page) == sid and set(server.hub.sessions) == sessions  # the same one, no new session
            # Everything said before the reload is shown again, in the same order, and more may follow.
            expect(page.locator("#feed .answer .text").first).to_have_text(answer)
            assert page.locator(SAID).all_inner_texts()[-len(said):] == said
            expect(page.locator("#feed .question .text").last).to_have_text("Q: " + FIRST)
            page.locator("#feed .answer").first.click()  # its timeline is still there
            expect(page.locator("#tl-title")).to_contain_text("Q: " + FIRST)
            expect(page.locator("#top-frames img").first).to_be_visible(timeout=10_000)
            _keeps_answering(page, server, sid, expect)
            assert not errors, errors
            page.click("#stop")
            _wait(lambda: sid not in server.hub.sessions, 10, "the session closed")
            page.reload()  # stopped: the page no longer comes back to it
            expect(page.locator("#status")).to_contain_text("ready", timeout=15_000)
            assert _sid(page) is None
        finally:
            browser.close()


def test_gone_session_is_said_and_never_replaced(server, clip_path, tmp_path):
    need_browser()
    from playwright.sync_api import expect, sync_playwright

    y4m = make_y4m(clip_path, tmp_path / "camera.y4m", seconds=2.0)
    missing = "0123456789ab"
    with sync_playwright() as p:
        browser = launch(p, y4m)
        try:
            page = browser.new_page()
            sessions = set(server.hub.sessions)
            page.goto(f"{server.url}/#session={missing}")
            expect(page.locator("#notice")).to_be_visible(timeout=15_000)
            expect(page.locator("#notice-text")).to_contain_text(f"Session {missing} cannot come back")
            expect(page.locator("#status")).to_contain_text(f"session {missing} is gone")
            assert set(server.hub.sessions) == sessions and _sid(page) is None  # nothing started on its own
            page.click("#notice-new")  # the offered new session
            expect(page.locator("#status")).to_contain_text(STARTED, timeout=15_000)
            expect(page.locator("#notice")).to_be_hidden()
            new = _sid(page)
            assert new and new != missing and set(server.hub.sessions) == sessions | {new}
            page.click("#stop")
        finally:
            browser.close()


def test_restarted_server_resumes_the_session_from_its_save(model, clip_path, tmp_path):
    need_browser()
    from playwright.sync_api import expect, sync_playwright

    sessions = tmp_path / "sessions"
    y4m = make_y4m(clip_path, tmp_path / "camera.y4m", seconds=4.0)
    first = start(model, sessions_dir=sessions)
    port = first.port
    with sync_playwright() as p:
        browser = launch(p, y4m)
        context = browser.new_context()  # one profile: its localStorage outlives the tab
        try:
            page = context.new_page()
            try:
                sid, answer = _start_and_answer(page, first, expect)
                said = page.locator(SAID).all_inner_texts()
                page.close()  # the tab goes away...
            finally:
                first.stop()  # ...and so does the server
            saved = first.hub.sessions[sid].session.saved_frames
            assert saved >= 3
            second = start(model, sessions_dir=sessions, port=port)  # same address, same directory
            try:
                assert sid not in second.hub.sessions
                page = context.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(second.url + "/")  # the bare address: the page remembers its session
                expect(page.locator("#status")).to_contain_text(f"session {sid} · ", timeout=30_000)
                expect(page.locator("#status")).to_contain_text(f"resumed at frame {saved}")
                assert _sid(page) == sid and list(second.hub.sessions) == [sid]
                expect(page.locator("#feed .note").first).to_contain_text(f"resumed from its last save: frame {saved}")
                assert page.locator(SAID).all_inner_texts()[-len(said):] == said
                page.locator("#feed .answer").first.click()  # said before the restart: its reads were not saved
                expect(page.locator("#tl-title")).to_contain_text(answer)
                expect(page.locator("#top-frames")).to_contain_text("not known")
                _keeps_answering(page, second, sid, expect)
                assert second.hub.sessions[sid].session.frames > saved
                assert not errors, errors
            finally:
                second.stop()
        finally:
            browser.close()


def test_open_page_reconnects_to_a_restarted_server(model, clip_path, tmp_path):
    """The server goes away under an open page and comes back on the same --sessions-dir: the page
    resumes its session by itself, without a reload, and the camera feeds it again."""
    need_browser()
    from playwright.sync_api import expect, sync_playwright

    sessions = tmp_path / "sessions"
    y4m = make_y4m(clip_path, tmp_path / "camera.y4m", seconds=2.0)
    first = start(model, sessions_dir=sessions)
    with sync_playwright() as p:
        browser = launch(p, y4m)
        try:
            page = browser.new_page()
            page.goto(first.url + "/")
            expect(page.locator("#status")).to_contain_text("ready", timeout=15_000)
            page.click("#start")
            expect(page.locator("#status")).to_contain_text(STARTED, timeout=15_000)
            sid = _sid(page)
            _wait(lambda: _processed(first, sid) >= 2, what="2 frames processed")
            first.stop()
            saved = first.hub.sessions[sid].session.saved_frames
            expect(page.locator("#status")).to_contain_text("reconnecting", timeout=15_000)
            second = start(model, sessions_dir=sessions, port=first.port)
            try:
                expect(page.locator("#status")).to_contain_text(f"session {sid} · ", timeout=30_000)
                expect(page.locator("#status")).to_contain_text(f"resumed at frame {saved}")
                _wait(lambda: sid in second.hub.sessions and _processed(second, sid) >= saved + 2, what="frames after the restart")
                assert list(second.hub.sessions) == [sid]
            finally:
                second.stop()
        finally:
            browser.close()
