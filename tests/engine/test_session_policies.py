"""The session under the policies and tiers it meets in use (issue 16 item 5): sampling with a seed,
the KV on device, host and disk inside a session, an offloading and an evicting policy while the
positions are re-indexed. The references are `full` sessions on the same frames."""

from __future__ import annotations

import pytest
import torch

from vrex.engine.positions import PositionConfig
from vrex.engine.session import SessionConfig, StreamingSession
from vrex.kv.policies import make_policy
from vrex.kv.telemetry import selection_summary


def _session(videollm, spec: str, **config) -> StreamingSession:
    return StreamingSession(videollm, make_policy(spec), SessionConfig(**config))


def _logits(session: StreamingSession, photos, frames: int) -> list[torch.Tensor]:
    out = []
    for i in range(frames):
        session.push_frame(0.5 * i, photos[i % len(photos)])
        out.append(session.last_logits.float().clone())
    return out


def _token_bytes(session: StreamingSession) -> int:
    """K + V of one token over all layers, from the store's own count."""
    return sum(session.store.resident_bytes().values()) // session.cached_tokens


def _narrations(videollm, photos, **config) -> list[str]:
    session = _session(videollm, "full", theta=1.0, max_response_tokens=8, **config)  # theta 1: speaks after every frame
    return [e.text for i in range(3) for e in session.push_frame(0.5 * i, photos[i]) if e.kind == "response"]


def test_sampling_follows_the_seed(videollm, photos):
    greedy = _narrations(videollm, photos)
    first, again = _narrations(videollm, photos, sample=True, seed=1), _narrations(videollm, photos, sample=True, seed=1)
    other = _narrations(videollm, photos, sample=True, seed=2)
    assert len(first) == 3 and first == again  # the seed alone decides the draws
    assert first != other and first != greedy  # ... and they are draws


def test_tiers_inside_a_session_change_where_the_kv_sits_not_the_outputs(videollm, photos, tmp_path):
    """flexgen reads every token, as full does: over a device tier of 30 tokens and a host tier of 40
    (the rest on disk) its logits are full's."""
    full = _session(videollm, "full", theta=0.0)
    reference = _logits(full, photos, 6)
    per_token = _token_bytes(full)
    tiered = _session(videollm, "flexgen", theta=0.0, device_budget_bytes=30 * per_token,
                      host_budget_bytes=40 * per_token, disk_dir=str(tmp_path))
    got = _logits(tiered, photos, 6)
    resident = tiered.store.resident_bytes()
    assert 0 < resident["device"] <= 30 * per_token and 0 < resident["host"] <= 40 * per_token and resident["disk"] > 0
    for a, b in zip(reference, got):
        torch.testing.assert_close(b, a, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", ["rekv[ratio=1.0,max_ratio=1.0]", "streamingllm[window=100000]"])
def test_offloading_and_resident_policies_across_reindexing_equal_full(videollm, photos, tmp_path, spec):
    """Positions re-indexed (max_position 100: every few frames) while the past sits on host and disk
    (rekv, offloading) or on the device (streamingllm, resident): with every token read, the logits
    are full's under the same re-indexing, so every tier's keys were re-rotated."""
    positions = PositionConfig(mode="compress", max_position=100)
    full = _session(videollm, "full", theta=0.0, positions=positions, recent_tokens=0)
    reference = _logits(full, photos, 14)
    assert full.cached_tokens > 100 and int(full.positions.max()) < 100  # it did re-index
    per_token = _token_bytes(full)
    tiers = dict(device_budget_bytes=20 * per_token, host_budget_bytes=30 * per_token, disk_dir=str(tmp_path)) \
        if spec.startswith("rekv") else {}
    session = _session(videollm, spec, theta=0.0, positions=positions, recent_tokens=0, **tiers)
    got = _logits(session, photos, 14)
    assert torch.equal(session.positions, full.positions)
    for k, (a, b) in enumerate(zip(reference, got)):
        torch.testing.assert_close(b, a, atol=2e-4, rtol=1e-4, msg=lambda m: f"frame {k}: {m}")


def test_evicting_policy_across_reindexing_stays_bounded(videollm, photos):
    """streamingllm evicts all but the sink and the window for good; with positions re-indexed it
    keeps running, its store holds at most sink + window + one step, and it still answers."""
    sink, window = 4, 40
    probe = _session(videollm, "full", theta=0.0)
    probe.push_frame(0.0, photos[0])
    per_token = _token_bytes(probe)
    session = _session(videollm, f"streamingllm[sink={sink},window={window}]", theta=0.0, recent_tokens=0,
                       positions=PositionConfig(mode="compress", max_position=100))
    for i in range(16):
        session.push_frame(0.5 * i, photos[i % len(photos)])
        assert torch.isfinite(session.last_logits).all()
        assert sum(session.store.resident_bytes().values()) <= (sink + window + 16) * per_token, i
    assert session.cached_tokens > 150 and int(session.positions.max()) < 100
    assert session.ask("What do you see?", 8.0) == []  # due at the next frame
    answers = [e for e in session.push_frame(8.0, photos[0]) if e.kind == "answer"]
    assert len(answers) == 1 and answers[0].text.strip()


def test_streamingllm_without_eviction_reads_the_same_and_keeps_every_token(videollm, photos):
    """``evict=false`` (how `vrex bench stream` fills long contexts in linear time): the same tokens
    are read as with eviction, so the logits are the same, but the store keeps the whole past and
    a fork of it with `full` attends to all of it."""
    prompt = _session(videollm, "full").cached_tokens  # the session always reads its prompt: make it the sink
    spec = f"streamingllm[sink={prompt},window=40]"
    evicting = _session(videollm, spec, theta=0.0, recent_tokens=0)
    keeping = _session(videollm, spec[:-1] + ",evict=false]", theta=0.0, recent_tokens=0)
    for k, (a, b) in enumerate(zip(_logits(evicting, photos, 8), _logits(keeping, photos, 8))):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=lambda m: f"frame {k}: {m}")
    per_token = _token_bytes(keeping)
    assert keeping.cached_tokens > prompt + 40 + 16
    assert sum(keeping.store.resident_bytes().values()) == keeping.cached_tokens * per_token
    assert sum(evicting.store.resident_bytes().values()) < keeping.cached_tokens * per_token
    with pytest.raises(ValueError, match="evicted"):
        evicting.fork(make_policy("full"))
    full = keeping.fork(make_policy("full"))
    assert full.cached_tokens == keeping.cached_tokens
    n_past = keeping.cached_tokens
    full.push_frame(4.0, photos[0])
    keeping.push_frame(4.0, photos[0])
    assert selection_summary(full.last_record)["selected_ratio"] == 1.0  # the fork reads the whole kept past
    assert selection_summary(keeping.last_record)["selected_ratio"] == pytest.approx((prompt + 40) / n_past)  # sink + window
