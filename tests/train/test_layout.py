"""The training sequence of a stream is token for token what StreamingSession feeds for it."""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import pytest
import torch

from vrex.train.layout import FRAME, IGNORE, LM, STREAM, LayoutBuilder, Step, Turn, embed_layout
from vrex.train.streams import NEEDLE_QUESTION


def scripted_steps() -> list[Step]:
    """Narration at frame 0, silence, a question, two questions at one frame, narration, silence."""
    steps = [Step("cockatoo", i, i / 2) for i in range(4)] + [Step("chelsea", i, (4 + i) / 2) for i in range(4)]
    steps[0].turns.append(Turn("A cockatoo."))
    steps[2].turns.append(Turn("A cockatoo.", "What is shown now?"))
    steps[4].turns.append(Turn("A cat."))
    steps[6].turns += [Turn("Yes.", "Did you see a cockatoo?"), Turn("No.", "Did you see a horse?")]
    steps[7].turns.append(Turn("A cat.", NEEDLE_QUESTION))
    return steps


def test_layout_by_hand(videollm):
    """The layout spelled out with the format strings (independent of the builder's loop)."""
    builder = LayoutBuilder.for_model(videollm)
    fmt, tok = videollm.fmt, lambda s: videollm.tokenize(s).tolist()
    steps = [Step("cockatoo", 0, 0.0, [Turn("A cockatoo.")]), Step("cockatoo", 1, 0.5), Step("cockatoo", 2, 1.0),
             Step("cockatoo", 3, 1.5, [Turn("Yes.", "Is it a bird?")])]
    layout = builder.build(steps)
    F = [FRAME] * videollm.tokens_per_frame
    expected = (tok(fmt.prefix) + F + tok(fmt.respond) + tok("A cockatoo.") + tok(fmt.stop) + tok(fmt.resume) + F
                + tok(fmt.interval) + F + tok(fmt.interval) + F + tok(fmt.question.format(question="Is it a bird?")) + tok("Yes."))
    assert layout.ids.tolist() == expected


@pytest.mark.parametrize("tag_tokens", [0, 3])
def test_layout_matches_streaming_session(videollm, cache, monkeypatch, tag_tokens):
    """Run the real StreamingSession on the same frames with the same decisions (forced through the
    logits) and compare everything it prefills with the training layout's input embeddings (also
    with ImageNet tag tokens after each frame's visual tokens)."""
    from vrex.engine import session as session_mod
    from vrex.kv.policies import make_policy
    from vrex.models.tags import equip_tags
    from vrex.train.features import feature_model

    base = copy.copy(videollm)
    base.connector = copy.deepcopy(videollm.connector)
    if tag_tokens:
        equip_tags(base, tag_tokens, min_prob=0.3)
        base.connector.tag_pad.data.normal_()
    model = feature_model(base, base.connector)
    assert model.tokens_per_frame == videollm.tokens_per_frame + tag_tokens
    builder = LayoutBuilder.for_model(model)
    steps = scripted_steps()
    layout = builder.build(steps)
    feats = torch.stack([cache.features[s.media][s.frame] for s in steps]).float()
    with torch.no_grad():
        expected = embed_layout(model, layout, feats)

    # decisions: what the model "says" (text + stop, in order) and whether each frame is silent
    script = []
    for s in steps:
        for turn in (s.questions or ([s.narration] if s.narration else [])):
            script += model.tokenize(turn.text).tolist() + [builder.stop]
    silent = [not s.turns for s in steps]
    fed: list[torch.Tensor] = []
    vocab = videollm.lm.config.vocab_size
    state = {"frame": 0}

    def fake_forward(self, embeds, stage, frame_id=None, frame_spans=None):
        fed.append(embeds.detach().clone())
        logits = torch.zeros(embeds.shape[0], vocab)
        if stage == "frame":
            logits[-1, builder.interval] = 100.0 if silent[state["frame"]] else -100.0
            state["frame"] += 1
        elif self.cache.keep.sink_tokens is not None and state["frame"] > 0:
            logits[-1, script.pop(0)] = 100.0
        self.positions = torch.cat([self.positions, torch.arange(embeds.shape[0])])
        return logits, SimpleNamespace(layers=[])

    monkeypatch.setattr(session_mod.StreamingSession, "_forward", fake_forward)
    session = session_mod.StreamingSession(model, make_policy("full"))
    for s in steps:
        for turn in s.questions:
            session.ask(turn.question, s.t)
        session.push_frame(s.t, cache.features[s.media][s.frame])
    assert not script, "the session did not consume every scripted token"
    got = torch.cat(fed)
    assert got.shape == expected.shape, f"session fed {got.shape[0]} positions, layout has {expected.shape[0]}"
    text = ~layout.frame_mask
    assert torch.equal(got[text], expected[text]), "text tokens differ"
    assert torch.allclose(got[~text], expected[~text], atol=1e-5), "frame tokens differ"


def test_loss_masks(videollm):
    """LM targets are exactly each reply's tokens + stop; STREAM targets sit exactly on the last
    token of every gated frame without a question (interval if silent, respond[0] if speaking)."""
    builder = LayoutBuilder.for_model(videollm)
    steps = scripted_steps()
    steps[5].gate = False
    layout = builder.build(steps)
    tpf = videollm.tokens_per_frame
    lm_targets = layout.targets[layout.kinds == LM].tolist()
    replies = []
    for s in steps:
        for turn in (s.questions or ([s.narration] if s.narration else [])):
            replies += videollm.tokenize(turn.text).tolist() + [builder.stop]
    assert lm_targets == replies
    stream_pos = (layout.kinds == STREAM).nonzero().flatten().tolist()
    want = [(start + tpf - 1, builder.interval if not s.turns else builder.respond[0])
            for start, s in zip(layout.frame_starts, steps) if s.gate and not s.questions]
    assert [(p, int(layout.targets[p])) for p in stream_pos] == want
    assert (layout.targets[layout.kinds == 0] == IGNORE).all()
    assert (layout.targets[layout.kinds != 0] != IGNORE).all()
    # every LM target is the next input token (teacher forcing), except the final stop (owed to the next step)
    lm_pos = (layout.kinds == LM).nonzero().flatten()
    inside = lm_pos[lm_pos + 1 < len(layout)]
    nxt = layout.ids[inside + 1]
    ok = (nxt == layout.targets[inside]) | (layout.targets[inside] == builder.stop)
    assert ok.all()


def test_generated_streams_are_consistent(maker, videollm):
    builder = LayoutBuilder.for_model(videollm)
    rng = random.Random(0)
    for _ in range(30):
        stream = maker.narration_stream(rng) if rng.random() < 0.5 else maker.needle_stream(rng, rng.randint(12, 40), narrate=rng.random() < 0.5)
        for s in stream.steps:
            assert not (s.questions and s.narration), "a frame cannot both narrate and answer"
        layout = builder.build(stream.steps)
        assert int(layout.frame_mask.sum()) == len(stream.steps) * videollm.tokens_per_frame
        # narration at every segment change (narrated streams)
        if stream.kind != "needle-silent":
            for seg in stream.segments:
                first = stream.steps[seg.start]
                assert first.narration is not None or first.questions


@pytest.mark.parametrize("n_frames", [0, 1, 2, 7])
def test_silent_length_is_the_built_length(videollm, n_frames):
    """The position count the long-needle checks use equals the layout the session would feed."""
    builder = LayoutBuilder.for_model(videollm)
    steps = [Step("cockatoo", i, i / 2, gate=False) for i in range(n_frames)]
    assert builder.silent_length(n_frames) == len(builder.build(steps))
