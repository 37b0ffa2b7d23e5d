"""The speculative LIVE loop (evaluation's fast path under `full`) decides and says exactly what
StreamingSession says, frame by frame, on real media with the real model."""

from __future__ import annotations

import random

import pytest

from vrex.train.data import split_names
from vrex.train.streams import NEEDLE_QUESTION, StreamMaker
from vrex.train.trainer import stream_features


def _session_events(model, stream, feats, theta):
    from vrex.engine.session import SessionConfig, StreamingSession
    from vrex.kv.policies import make_policy

    session = StreamingSession(model, make_policy("full"), SessionConfig(theta=theta, max_response_tokens=6, max_answer_tokens=6))
    out = []
    for k, step in enumerate(stream.steps):
        for turn in step.questions:
            session.ask(turn.question, step.t)
        for e in session.push_frame(step.t, feats[k]):
            if e.kind in ("response", "answer"):
                out.append((k, e.kind, e.text))
    return out


@pytest.fixture(scope="module")
def needle(cache, catalog):
    maker = StreamMaker(cache, catalog, split_names(catalog, "heldout"))
    return maker.needle_stream(random.Random(3), 14, haystack="cat", needle="bird", position=0.4, narrate=False)



# The untrained connector's P(interval) on this stream: 0.02-0.05 before it first speaks, ~0.001
# after (it then keeps talking), 0.03 at frame 9. theta 0.0: never speaks (long speculative chunks);
# theta 0.03: silent, speaks, keeps speaking, falls silent once (crops and short chunks).
@pytest.mark.parametrize("theta", [0.0, 0.03])
def test_speculative_equals_session(videollm, cache, needle, theta):
    from vrex.train.evaluate import feature_model
    from vrex.train.speculative import SpeculativeLive

    model = feature_model(videollm, videollm.connector)
    feats = stream_features(cache, needle)
    want = _session_events(model, needle, feats, theta)
    live = SpeculativeLive(model, theta, max_response_tokens=6, max_answer_tokens=6, chunk=8)
    got = live.run(feats, {len(needle.steps) - 1: [NEEDLE_QUESTION]})
    assert [(e.frame, e.kind, e.text) for e in got] == want
    assert want[-1][1] == "answer"
    responses = sum(kind == "response" for _, kind, _ in want)
    if theta > 0:  # both the speaking and the silent path ran
        assert 0 < responses < len(needle.steps) - 1
    else:
        assert responses == 0 and live.forwards < len(needle.steps)
