"""Inputs that are not videos must fail at once with a message naming them."""

from __future__ import annotations

import os
import shutil
import sys
import wave

import pytest

from vrex.io import VideoSource, VideoSourceError, open_source


def test_missing_file(tmp_path):
    path = tmp_path / "nope.mp4"
    with pytest.raises(VideoSourceError, match="nope.mp4: no such file") as err:
        open_source(path)
    assert str(path) in str(err.value) and err.value.uri == str(path)


@pytest.mark.parametrize(
    "name,content,why",
    [
        ("notes.txt", b"just some text\n", "cannot open as video"),
        ("fake.mp4", b"this is not really an mp4 file\n" * 20, "cannot open as video"),
        ("empty.mp4", b"", "cannot open as video"),
    ],
)
def test_files_that_are_not_video(tmp_path, name, content, why):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(VideoSourceError, match=why) as err:
        open_source(path)
    assert str(path) in str(err.value)


def test_text_file_ffmpeg_would_render_as_ansi_art(assets, tmp_path):
    # FFmpeg's 'tty' demuxer turns a large .txt into a "video"; we refuse it.
    path = tmp_path / "labels.txt"
    shutil.copy(assets / "images" / "imagenet_labels.txt", path)
    with pytest.raises(VideoSourceError, match=r"labels\.txt: not a video"):
        open_source(path)


def test_audio_only_file(tmp_path):
    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * 800)
    with pytest.raises(VideoSourceError, match=r"tone\.wav: no video stream \(found: audio\)"):
        open_source(path)


def test_still_image_file_is_a_one_frame_stream(assets):
    # Documented choice: a picture passed as a file is a one-frame video at t=0.
    with open_source(assets / "images" / "horse.png", fps=2) as src:
        frames = list(src)
    assert len(frames) == 1 and frames[0].t == 0.0 and frames[0].image.mode == "RGB"


@pytest.mark.parametrize("uri", ["ftp://example.com/a.mp4", "gopher://x/y"])
def test_unsupported_url_scheme(uri):
    with pytest.raises(VideoSourceError, match="unsupported URL scheme") as err:
        open_source(uri)
    assert uri in str(err.value)


def test_nonsense_and_empty_names():
    with pytest.raises(VideoSourceError, match="definitely not a source: no such file"):
        open_source("definitely not a source")
    with pytest.raises(VideoSourceError, match="empty input name"):
        open_source("")


def test_special_file_is_refused():
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    with pytest.raises(VideoSourceError, match="/dev/null: not a regular file"):
        open_source("/dev/null")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="v4l2 device naming is Linux-only")
@pytest.mark.parametrize("uri,device", [("webcam:57", "/dev/video57"), ("/dev/video57", "/dev/video57")])
def test_missing_webcam(uri, device):
    with pytest.raises(VideoSourceError, match=f"{uri}: no such webcam device {device}"):
        open_source(uri)


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("no pictures here")
    with pytest.raises(VideoSourceError, match="folder has no images") as err:
        open_source(tmp_path)
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize(
    "kw", [{"fps": -1}, {"size": 0}, {"start": -1.0}, {"start": 5.0, "end": 2.0}, {"max_frames": -2}]
)
def test_bad_arguments(video, kw):
    with pytest.raises(ValueError):
        VideoSource(video("realshort.mp4"), **kw)
