"""Detached-memory needle training (vrex.train.long_context): the spliced loss is the full forward's
loss when nothing is stale, and a narrated long needle trains the connector through the span."""

from __future__ import annotations

import random

import pytest
import torch

from vrex.train.layout import LayoutBuilder, Step, Turn
from vrex.train.long_context import QUESTION_MARGIN, build_memory, frame_features, long_needle_loss, needle_steps, spliced_loss
from vrex.train.streams import NEEDLE_QUESTION
from vrex.train.trainer import live_loss


@pytest.fixture(scope="module")
def memory(videollm, cache, maker):
    return build_memory(videollm, LayoutBuilder.for_model(videollm), cache, maker, random.Random(0), 30, haystack="horse")


@pytest.mark.parametrize("a,k", [(3, 2), (11, 4)])
def test_spliced_loss_equals_full_forward_when_nothing_is_stale(videollm, memory, a, k):
    # the "needle" is the haystack's own frames: the memory's KV after the span is then exact
    n = 26
    steps = [Step(s.media, s.frame, s.t, gate=False) for s in memory.steps[:n]]
    steps[-1].turns = [Turn("A horse.", NEEDLE_QUESTION)]
    builder = LayoutBuilder.for_model(videollm)
    feats = memory.features[:n]
    with torch.no_grad():
        spliced, stats = spliced_loss(videollm, builder, memory, steps, feats, a, k)
        full, full_stats = live_loss(videollm, builder.build(steps), feats)
    assert stats["tokens"] == full_stats["tokens"]
    torch.testing.assert_close(spliced, full, rtol=1e-4, atol=1e-4)


def test_narrated_long_needle_trains_the_connector(videollm, cache, maker, memory):
    builder = LayoutBuilder.for_model(videollm)
    rng = random.Random(5)
    steps = needle_steps(memory, maker, rng, 28, 9, "parrot", 3, narrate=True)
    assert steps[9].narration.text == "A parrot." and steps[12].narration.text == "A horse."
    conn = videollm.connector
    conn.zero_grad(set_to_none=True)
    conn.requires_grad_(True)
    try:
        loss, stats = spliced_loss(videollm, builder, memory, steps, frame_features(cache, steps), 9, 3)
        loss.backward()
        assert stats["stream_acc"] == stats["stream_acc"]  # gate labels inside the span (not NaN)
        assert conn.fc1.weight.grad is not None and conn.fc1.weight.grad.abs().sum() > 0
    finally:
        conn.requires_grad_(False)
        conn.zero_grad(set_to_none=True)


def test_long_needle_sample_and_bad_span(videollm, cache, maker, memory):
    builder = LayoutBuilder.for_model(videollm)
    with torch.no_grad():
        loss, stats = long_needle_loss(videollm, builder, cache, maker, memory, random.Random(1), (20, 400), 0.5)
    assert torch.isfinite(loss) and stats["tokens"] <= len(memory.layout) + 40
    steps = needle_steps(memory, maker, random.Random(2), 20, 15, "parrot", 3, narrate=False)
    with pytest.raises(ValueError, match="does not fit"):
        spliced_loss(videollm, builder, memory, steps, frame_features(cache, steps), 17, 3)


def test_haystack_past_the_lm_positions_is_refused(videollm, cache, maker):
    builder = LayoutBuilder.for_model(videollm)
    limit = videollm.lm.config.max_position_embeddings
    fits = next(n for n in range(limit, 0, -1) if builder.silent_length(n) + QUESTION_MARGIN <= limit)
    build_memory(videollm, builder, cache, maker, random.Random(0), 4)  # small ones are built
    with pytest.raises(ValueError, match=f"{fits + 1}-frame haystack .* the LM has {limit}"):
        build_memory(videollm, builder, cache, maker, random.Random(0), fits + 1)
