"""Position re-indexing spread over steps (``PositionConfig.spread``, ``VrexCache.begin_reindex``), on
the real model: a layer not yet moved computes exactly what it computed before, moving every layer
ends where an all-at-once re-index ends, and a session, a fork and a saved-and-loaded session keep
going across it."""

from __future__ import annotations

import pytest
import torch

from vrex.engine.positions import PositionConfig, compressed_positions
from vrex.engine.session import SessionConfig, StreamingSession
from vrex.kv.policies import make_policy


def _filled(videollm, photos, spec: str, kernels: str, frames: int = 4) -> StreamingSession:
    config = SessionConfig(theta=0.0, kernels=kernels, positions=PositionConfig(mode="absolute"))
    session = StreamingSession(videollm, make_policy(spec), config)
    for i in range(frames):
        session.push_frame(0.5 * i, photos[i % len(photos)])
    return session


def _step(session: StreamingSession, image, previous, start: int) -> torch.Tensor:
    """One frame step at positions ``start..``, straight through the cache (no position logic)."""
    embeds = session.model.embed_frames([image], previous=previous)[0]
    positions = torch.arange(start, start + embeds.shape[0])
    session.cache.begin_step("frame", 99)
    with torch.no_grad():
        out = session.model.lm(inputs_embeds=embeds[None], position_ids=positions[None], past_key_values=session.cache,
                               use_cache=True, vrex_cache=session.cache)
    session.cache.end_step()
    return out.logits[0, -1]


@pytest.mark.parametrize("spec,kernels", [("full", "fast"), ("resv", "fast"), ("resv", "reference")])
def test_pending_layers_compute_what_they_did_and_moving_them_all_equals_reindexing_at_once(videollm, photos, spec,
                                                                                           kernels):
    base = _filled(videollm, photos, spec, kernels)
    spread, plain = base.fork(make_policy(spec)), base.fork(make_policy(spec))
    n0 = base.cached_tokens
    sink = base.cache.keep.sink_tokens
    new = compressed_positions(base.positions, sink, sink + 20)
    delta = new - base.positions
    shift = int(base.positions[-1]) - int(new[-1])
    assert shift > 0
    spread.cache.begin_reindex(delta, shift)  # nothing moved yet: every layer in the old frame
    previous = videollm.encode_frames([photos[3]])[0]
    # the same frame at new positions (spread, every layer pending) and at old ones (plain): equal
    got = _step(spread, photos[4], previous, int(new[-1]) + 1)
    want = _step(plain, photos[4], previous, int(base.positions[-1]) + 1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # a few layers move, then the rest; the result is the old-frame store re-indexed at once
    spread.cache.advance_reindex(7)
    assert len(spread.cache.reindex_pending.layers) == len(spread.cache.specs) - 7
    moved_copy = spread.cache.current_keys(20)  # a pending layer, seen at the new positions (store untouched)
    spread.cache.finish_reindex()
    assert spread.cache.reindex_pending is None
    n = plain.store.layers[0].length  # the stepped frame too (_step bypasses the session's own count)
    assert n > n0
    plain.cache.reindex(torch.cat([delta, torch.full((n - n0,), -shift)]))
    for layer in range(plain.store.num_layers):
        torch.testing.assert_close(spread.store.layers[layer].keys(), plain.store.layers[layer].keys(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(moved_copy, plain.store.layers[20].keys(), atol=1e-4, rtol=1e-4)
    if spec == "resv":  # the policy's index followed each layer's move
        for a, b in zip(spread.policy.tables, plain.policy.tables):
            torch.testing.assert_close(a.mean_keys()[0], b.mean_keys()[0], atol=1e-4, rtol=1e-4)
            assert torch.equal(a.codes, b.codes)


def test_a_spread_session_moves_layers_over_several_frames_within_the_trained_window(videollm, photos):
    max_position = 160  # with compress_to 0.25 a re-index frees 84 tokens: room to begin 2 frames early
    config = SessionConfig(theta=0.0, positions=PositionConfig(mode="compress", max_position=max_position,
                                                               compress_to=0.25, spread=4))
    session = StreamingSession(videollm, make_policy("resv"), config)
    assert session._reindex_spread(11) == 3  # 4 asked, 3 fit the room
    moving, forked = [], None
    for i in range(34):
        stats = session.push_frame(0.5 * i, photos[i % len(photos)])[0].stats
        pending = session.cache.reindex_pending
        moving.append(stats["reindex_ms"] > 0)
        assert int(session.positions.max()) < max_position
        if pending is not None:
            # a layer still in the old frame never sees positions past the trained window
            assert int(session.positions[-1]) + pending.shift < max_position
            assert 0 < len(pending.layers) < len(session.cache.specs)
            if forked is None:  # a fork mid-way copies every layer at the stream's positions
                forked = session.fork(make_policy("resv"))
                assert forked.cache.reindex_pending is None
                for layer in (0, len(session.cache.specs) - 1):
                    torch.testing.assert_close(forked.store.layers[layer].keys(), session.cache.current_keys(layer))
    assert session.cached_tokens > 2 * max_position  # it re-indexed more than once
    runs = "".join("x" if m else "." for m in moving)
    assert "xx" in runs, runs  # the layers moved over consecutive frames, not in one
    assert forked is not None
    forked.push_frame(7.0, photos[0])
    assert torch.isfinite(forked.last_logits).all()


def test_saved_mid_spread_and_loaded_continues_like_the_uninterrupted_run(videollm, photos, tmp_path):
    config = SessionConfig(theta=0.0, positions=PositionConfig(mode="compress", max_position=160, compress_to=0.25, spread=3))
    frames = [(0.5 * i, photos[i % len(photos)]) for i in range(14)]
    reference = StreamingSession(videollm, make_policy("resv"), config)
    want = [reference.push_frame(t, im)[0].stats["p_interval"] for t, im in frames]
    session = StreamingSession(videollm, make_policy("resv"), config)
    session.save(tmp_path / "s")
    done = 0
    while session.cache.reindex_pending is None:
        session.push_frame(*frames[done])
        session.save()
        done += 1
    assert done < len(frames) - 3  # saved (journaled) while layers were still moving, frames left to compare
    session.close()
    loaded = StreamingSession.load(tmp_path / "s", videollm)
    assert loaded.cache.reindex_pending is not None  # the replay moved the same layers at the same steps
    got = [loaded.push_frame(t, im)[0].stats["p_interval"] for t, im in frames[done:]]
    assert got == want[done:]
    loaded.close()


def test_spread_must_be_a_positive_integer():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="spread"):
            PositionConfig(spread=bad)
