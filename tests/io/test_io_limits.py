"""One limit on decoded frame size for every source path, checked before decoding."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import pytest
from PIL import Image

from vrex.io import MAX_FRAME_PIXELS, VideoDecodeWarning, VideoSourceError, open_source


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    """A 20000x10000 PNG of ~45 kB (one colour, 1 bit per pixel): 600 MB once decoded to RGB."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    Image.new("1", (20000, 10000), 1).save(path)
    assert path.stat().st_size < 100_000
    return path


_PROBE = """
import json, resource, sys
from vrex.io import VideoSourceError, open_source
try:
    with open_source(sys.argv[1]) as src:
        list(src)
    error = None
except VideoSourceError as e:
    error = str(e)
print(json.dumps({"error": error, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def test_huge_image_file_is_refused_from_its_header(huge_png, assets):
    """The probe of the issue: this file used to reach 3.5 GB RSS. Now it fails before decoding."""

    def probe(path):
        out = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True, timeout=60)
        return json.loads(out.stdout.strip().splitlines()[-1])

    refused, normal = probe(huge_png), probe(assets / "images" / "horse.png")
    assert refused["error"] == (f"{huge_png}: frame size 20000x10000 (200.0 megapixels) exceeds the limit of "
                                f"{MAX_FRAME_PIXELS / 1e6:.1f} megapixels (raise it with max_frame_pixels)")
    assert normal["error"] is None
    # Opening the huge file costs what opening a small one does (a decode would add 600+ MB).
    assert refused["peak_mb"] < normal["peak_mb"] + 50, (refused, normal)


def test_video_is_refused_from_its_stream_header(video):
    with pytest.raises(VideoSourceError, match=r"cockatoo\.mp4: frame size 1280x720 \(0\.9 megapixels\)"):
        open_source(video("cockatoo.mp4"), max_frame_pixels=640 * 480)
    with open_source(video("cockatoo.mp4"), max_frame_pixels=1280 * 720, max_frames=1) as src:
        assert len(list(src)) == 1  # the limit is inclusive


def test_folder_skips_an_oversized_image_and_names_it(tmp_path, huge_png, image_paths):
    shutil.copy(image_paths[0], tmp_path / "a.png")
    shutil.copy(huge_png, tmp_path / "b.png")
    shutil.copy(image_paths[1], tmp_path / "c.png")
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VideoDecodeWarning)
        with open_source(tmp_path, fps=1, size=16, on_warning=seen.append) as src:
            times = [f.t for f in src]
    assert times == [0.0, 2.0]
    (record,) = seen
    assert record.kind == "too_large" and record.t == 1.0
    assert "b.png: frame size 20000x10000 (200.0 megapixels) exceeds the limit" in record.reason
    assert src.stats.skipped_corrupt == 0 and src.stats.decoded == 2


def test_folder_uses_the_same_caller_limit(photo_dir, image_paths):
    with Image.open(image_paths[0]) as im:
        limit = im.width * im.height - 1  # the first photo is one pixel too many
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VideoDecodeWarning)
        with open_source(photo_dir, fps=2, size=16, max_frame_pixels=limit) as src:
            list(src)
    too_large = [r for r in src.stats.records if r.kind == "too_large"]
    assert too_large and "img_1" in too_large[0].reason and f"{im.width}x{im.height}" in too_large[0].reason


@pytest.mark.parametrize("bad", [0, -5, 1.5])
def test_bad_limit(video, bad):
    with pytest.raises(ValueError, match="max_frame_pixels"):
        open_source(video("realshort.mp4"), max_frame_pixels=bad)
