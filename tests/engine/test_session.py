"""The LIVE loop on the real SmolLM2 weights: iterative prefill, positions, questions."""

from __future__ import annotations

import pytest
import torch

from vrex.engine.positions import PositionConfig, compressed_positions, rerotate
from vrex.engine.session import SessionConfig, StreamingSession
from vrex.kv.policies import make_policy


def _capture_frame_logits(session: StreamingSession) -> list[torch.Tensor]:
    """Record the logits of the last token of every frame step."""
    captured = []
    forward = session._forward

    def spy(embeds, stage, frame_id=None, frame_spans=None):
        logits, record = forward(embeds, stage, frame_id, frame_spans)
        if stage == "frame":
            captured.append(logits[-1].clone())
        return logits, record

    session._forward = spy
    return captured


def _one_shot(model, session: StreamingSession, frames, position_ids=None) -> tuple[torch.Tensor, list[int]]:
    """One forward over the whole interleaved LIVE sequence (no cache); returns logits and frame-end indices."""
    parts = [model.embed_text(model.tokenize(model.fmt.prefix))]
    ends = []
    frame_embeds = model.embed_frames(list(frames))  # one batch of consecutive frames (temporal connector)
    for i, image in enumerate(frames):
        if i:
            parts.append(model.embed_text(torch.tensor([session.interval_id])))
        parts.append(frame_embeds[i])
        ends.append(sum(p.shape[0] for p in parts) - 1)
    embeds = torch.cat(parts)[None]
    with torch.no_grad():
        logits = model.lm(inputs_embeds=embeds, position_ids=position_ids).logits[0]
    return logits, ends


def test_iterative_prefill_equals_one_shot(videollm, photos):
    session = StreamingSession(videollm, make_policy("full"), SessionConfig(theta=0.0))
    captured = _capture_frame_logits(session)
    for i, image in enumerate(photos):
        events = session.push_frame(0.5 * i, image)
        assert [e.kind for e in events] == ["frame"]  # theta=0: never speaks
    logits, ends = _one_shot(videollm, session, photos)
    assert len(captured) == len(photos)
    for step, end in zip(captured, ends):
        torch.testing.assert_close(step, logits[end], atol=2e-4, rtol=1e-4)
    assert session.cached_tokens == ends[-1] + 1


def test_steps_run_the_lm_head_on_the_rows_they_read(videollm, photos):
    """A frame step and an answer's prefill read only the last token's logits: the LM head runs on that
    row alone (a frame's other rows were a fifth of its dense arithmetic). ``feed`` (the benchmarks'
    fidelity measure) still gets every row. The values: test_iterative_prefill_equals_one_shot."""
    session = StreamingSession(videollm, make_policy("full"), SessionConfig(theta=0.0, max_response_tokens=2))
    rows: list[int] = []
    hook = videollm.lm.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[-2]))
    try:
        session.push_frame(0.0, photos[0])
        assert rows == [1], rows
        rows.clear()
        session.ask("What is shown?")
        assert rows and set(rows) == {1}, rows
        rows.clear()
        fed = session._pending.numel() + 3  # the answer's stop and resume tokens go first
        logits = session.feed(torch.tensor([5, 6, 7]), "text")
        assert rows == [fed] and logits.shape[0] == fed, (rows, fed)
    finally:
        hook.remove()


def test_rerotate_moves_keys_to_new_positions(videollm):
    rotary = videollm.lm.model.rotary_emb
    raw = torch.randn(3, 20, 64)
    pos = torch.arange(100, 120)
    new = torch.arange(7, 27) * 2

    def rope(keys, positions):
        cos, sin = rotary(keys[None], positions[None])
        return keys * cos[0] + torch.cat([-keys[..., 32:], keys[..., :32]], -1) * sin[0]

    moved = rerotate(rope(raw, pos), new - pos, rotary.inv_freq)
    torch.testing.assert_close(moved, rope(raw, new), atol=1e-4, rtol=1e-4)


def test_compressed_positions_keep_order_and_sink():
    pos = torch.arange(0, 1000)
    new = compressed_positions(pos, sink=40, target_end=300)
    assert torch.equal(new[:40], pos[:40])
    assert int(new.max()) < 300
    assert bool((new[1:] >= new[:-1]).all())


def test_stream_past_trained_context_reindexes_keys(videollm, photos):
    """With a tiny max_position the session must re-index. Afterwards a frame step must equal
    transformers' own forward over the same cache content (re-rotated keys) at the new positions,
    and positions must stay below the limit however long the stream runs."""
    from transformers import DynamicCache

    config = SessionConfig(theta=0.0, positions=PositionConfig(mode="compress", max_position=90))
    session = StreamingSession(videollm, make_policy("full"), config)
    captured = _capture_frame_logits(session)
    reindexed = []
    for i, image in enumerate(photos[:5]):
        reindexed.append(session.push_frame(0.5 * i, image)[0].stats["reindex_ms"])
    assert session.cached_tokens > 90  # it really went past the limit
    # the frames whose step re-indexed say so (the first frames, under the limit, did not)
    assert reindexed[0] == 0.0 and any(ms > 0 for ms in reindexed), reindexed
    before = session.positions.clone()
    assert int(before.max()) < 90 and bool((before[1:] >= before[:-1]).all())
    pending = videollm.embed_text(session._pending)
    session.push_frame(2.5, photos[5])
    n_before = before.numel()
    new_positions = session.positions[n_before:]
    # The past as the session attended to it (re-rotated first if this step re-indexed again).
    reference = DynamicCache()
    for layer in range(session.store.num_layers):
        reference.update(session.store.layers[layer].keys()[None, :, :n_before], session.store.layers[layer].values()[None, :, :n_before], layer)
    embeds = torch.cat([pending, videollm.embed_frames([photos[5]], previous=videollm.encode_frames([photos[4]])[0])[0]])[None]
    with torch.no_grad():
        logits = videollm.lm(inputs_embeds=embeds, position_ids=new_positions[None], past_key_values=reference).logits[0]
    torch.testing.assert_close(captured[-1], logits[-1], atol=2e-4, rtol=1e-4)
    assert int(session.positions.max()) < 90


def test_question_answered_after_its_timestamp(videollm, photos):
    session = StreamingSession(videollm, make_policy("full"), SessionConfig(theta=0.0, max_answer_tokens=8))
    frames = [(0.5 * i, im) for i, im in enumerate(photos[:5])]
    events = list(session.run(frames, questions=[(1.2, "What is shown?")]))
    answers = [e for e in events if e.kind == "answer"]
    assert len(answers) == 1
    answer = answers[0]
    assert answer.t == 1.2 and answer.stats["answered_at"] == 1.5  # first frame at or after 1.2 s
    assert answer.text and answer.stats["tokens"] >= 1
    kinds = [e.kind for e in events]
    assert kinds.index("answer") == 4  # after the 4th frame (t=1.5), before the 5th
    frame_stats = [e.stats for e in events if e.kind == "frame"]
    assert all(s["total_ms"] > 0 and s["cached_tokens"] > 0 for s in frame_stats)
    assert frame_stats[-1]["cached_tokens"] > frame_stats[0]["cached_tokens"]


def test_gate_speaks_when_interval_probability_is_below_theta(videollm, photos):
    """theta above 1 forces a response after every frame; the stream must then resume cleanly."""
    session = StreamingSession(videollm, make_policy("full"), SessionConfig(theta=1.01, max_response_tokens=4))
    kinds = [e.kind for i, im in enumerate(photos[:3]) for e in session.push_frame(float(i), im)]
    assert kinds == ["frame", "response"] * 3


def test_min_response_gap_keeps_the_gate_closed_after_a_narration(videollm, photos):
    """theta > 1 wants to speak after every frame; a 1 s gap allows one narration per second of stream."""
    config = SessionConfig(theta=1.01, max_response_tokens=2, min_response_gap=1.0)
    session = StreamingSession(videollm, make_policy("full"), config)
    events = [e for i, im in enumerate(photos[:5]) for e in session.push_frame(0.5 * i, im)]
    assert [e.t for e in events if e.kind == "response"] == [0.0, 1.0, 2.0]


def test_out_of_order_frame_and_empty_question_are_refused(videollm, photos):
    session = StreamingSession(videollm, make_policy("full"), SessionConfig(theta=0.0))
    session.push_frame(1.0, photos[0])
    with pytest.raises(ValueError, match="before the previous frame"):
        session.push_frame(0.5, photos[1])
    with pytest.raises(ValueError, match="empty"):
        session.ask("   ")


def test_fast_forward_then_frames_equals_frame_by_frame(videollm, photos):
    """fast_forward (encoder features, chunked) leaves the session exactly where pushing the same frames
    one by one does, including the temporal connector's memory of the last frame."""
    stepped = StreamingSession(videollm, make_policy("full"), SessionConfig(theta=0.0))
    for i, image in enumerate(photos):
        stepped.push_frame(0.5 * i, image)
    fast = StreamingSession(videollm, make_policy("full"), SessionConfig(theta=0.0))
    fast.fast_forward([0.5 * i for i in range(5)], videollm.encode_frames(photos[:5]), chunk=2)
    for i in (5, 6):
        fast.push_frame(0.5 * i, photos[i])
    assert fast.cached_tokens == stepped.cached_tokens and fast.frames == stepped.frames
    torch.testing.assert_close(fast.last_logits, stepped.last_logits, atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="3 times for 2 frames"):
        fast.fast_forward([4.0, 4.5, 5.0], videollm.encode_frames(photos[:2]))
    with pytest.raises(ValueError, match="time order"):
        fast.fast_forward([1.0], videollm.encode_frames(photos[:1]))


@pytest.mark.parametrize("recent, frames", [(None, 2), (0, 0), (7, None)])
def test_recent_window_default_is_two_frames(videollm, recent, frames):
    """Unless told otherwise, every step reads the newest two frames (tokens + interval) whatever the
    policy selects; 0 leaves the policy alone; a number is taken as tokens."""
    session = StreamingSession(videollm, make_policy("rekv"), SessionConfig(theta=0.0, recent_tokens=recent))
    window = 7 if frames is None else frames * (videollm.tokens_per_frame + 1)
    n_past, sink = 400, session.cache.keep.sink_tokens
    kept = session.cache._with_always_kept([torch.tensor([sink + 5])], n_past)[0].tolist()
    assert kept == list(range(sink)) + [sink + 5] + list(range(n_past - window, n_past))


def test_negative_recent_window_is_refused(videollm):
    with pytest.raises(ValueError, match="recent_tokens must be >= 0"):
        StreamingSession(videollm, make_policy("rekv"), SessionConfig(recent_tokens=-1))


def test_question_past_the_end_is_answered_with_a_note(videollm, photos):
    """A question timed after the stream's last frame is answered at the end, saying so (never dropped,
    never dated after the stream)."""
    session = StreamingSession(videollm, make_policy("full"), SessionConfig(theta=0.0, max_answer_tokens=4))
    frames = [(0.5 * i, im) for i, im in enumerate(photos[:2])]
    events = list(session.run(frames, [(99999.0, "What is shown?"), (0.5, "And now?")]))
    answers = [e for e in events if e.kind == "answer"]
    assert [a.stats["question"] for a in answers] == ["And now?", "What is shown?"]
    late = answers[1]
    assert late.t == 0.5 and late.stats["asked_at"] == 99999.0 and "99999" in late.stats["note"]
    assert "note" not in answers[0].stats
