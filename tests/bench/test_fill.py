"""The benchmarks' shared fill (vrex.bench.fill, media): a looped stream is decoded and encoded once
per distinct frame, and the windowed fill keeps every token while computing them from a window."""

from __future__ import annotations

import pytest
import torch

from vrex.bench.engine import encode_all
from vrex.bench.fill import open_fill
from vrex.bench.media import long_stream


def test_a_looped_stream_repeats_its_frames_at_later_times():
    first = long_stream(8)
    looped = long_stream(400)  # longer than one pass of the shared clips at 2 fps
    period = next(i for i in range(1, len(looped)) if looped[i][1] is looped[0][1])
    assert [t for t, _ in looped[:8]] == [t for t, _ in first]
    assert all(a.tobytes() == b.tobytes() for (_, a), (_, b) in zip(first, looped))
    times = [t for t, _ in looped]
    assert all(b > a for a, b in zip(times, times[1:]))  # time goes on across the loop
    assert times[period] - times[period - 1] == pytest.approx(0.5)
    assert looped[period + 3][1] is looped[3][1]


def test_encode_all_encodes_a_repeated_frame_once_and_gives_its_features_each_time(videollm, photos):
    a, b = photos[0], photos[1]
    features = encode_all(videollm, [(0.0, a), (0.5, b), (1.0, a), (1.5, a)], batch=2)
    alone = videollm.encode_frames([a, b])
    assert features.shape[0] == 4
    torch.testing.assert_close(features[0], alone[0])
    torch.testing.assert_close(features[1], alone[1])
    assert torch.equal(features[2], features[0]) and torch.equal(features[3], features[0])


def test_windowed_fill_keeps_every_token_and_changes_only_what_the_window_hides():
    """A window of 32 tokens against the exact fill, to the same 1000 tokens (three chunks of 32
    frames): the same positions and count; the first layer's keys are the same (they see no other
    token); a higher layer's keys are the same in the first chunk (it saw the prompt and itself
    either way) and differ after it (the next chunks saw only 32 tokens of the chunk before)."""
    exact = open_fill([1000], 1, lm="smollm2-135m", log=lambda line: None)
    windowed = open_fill([1000], 1, lm="smollm2-135m", window=32, log=lambda line: None)
    exact.fill_to(1000), windowed.fill_to(1000)
    a, b = exact.base, windowed.base
    assert a.cached_tokens == b.cached_tokens >= 1000 - 13 and torch.equal(a.positions, b.positions)
    assert not b.store.layers[0].is_evicted().any()
    torch.testing.assert_close(b.store.layers[0].keys(), a.store.layers[0].keys(), atol=1e-5, rtol=1e-5)
    top = a.store.num_layers - 1
    first_chunk_end = a.spans[1 + 32][0]  # spans: (start, length, frame): the prompt, then one per frame
    ka, kb = a.store.layers[top].keys(), b.store.layers[top].keys()
    torch.testing.assert_close(kb[:, :first_chunk_end], ka[:, :first_chunk_end], atol=1e-4, rtol=1e-4)
    later = (kb[:, first_chunk_end:] - ka[:, first_chunk_end:]).abs().amax(dim=(0, 2))  # per token
    assert (later > 1e-2).float().mean() > 0.9
    with pytest.raises(ValueError, match="fill window"):
        open_fill([300], 1, lm="smollm2-135m", window=-1)
