"""Evaluation streams through the one LIVE loop, ``StreamingSession``, as a user runs it.

Frames are the cached encoder features (``features.feature_model``), so the session path is the
real one: pending text + frame tokens per step, the streaming-EOS gate at theta, greedy decoding,
the KV policy's selection in every attention. Every policy, ``full`` included, runs here.
"""

from __future__ import annotations

import torch

from vrex.engine.session import SessionConfig, StreamingSession
from vrex.kv.policies import make_policy
from vrex.train.data import FeatureCache
from vrex.train.features import stream_features
from vrex.train.layout import Step, Turn
from vrex.train.streams import NEEDLE_QUESTION, Stream


def session_for(model, policy: str, *, theta: float | None, max_response_tokens: int, max_answer_tokens: int,
                recent_tokens: int | None) -> StreamingSession:
    """A fresh session of ``model`` under ``policy`` (a spec); ``theta`` None: the session's default."""
    config = SessionConfig(max_response_tokens=max_response_tokens, max_answer_tokens=max_answer_tokens,
                           recent_tokens=recent_tokens)
    if theta is not None:
        config.theta = theta
    return StreamingSession(model, make_policy(policy), config)


def run_stream(session: StreamingSession, cache: FeatureCache, stream: Stream) -> list:
    """Free-run the LIVE loop over the stream's frames, its questions asked at their frames (answered
    right after them); returns the session's events."""
    events = []
    for step in stream.steps:
        for turn in step.questions:
            session.ask(turn.question, step.t)
        events += session.push_frame(step.t, cache.features[step.media][step.frame])
    return events


def run_needle_live(session: StreamingSession, cache: FeatureCache, stream: Stream) -> tuple[str, int]:
    """The needle stream live: the gate and narrations over every frame, the needle question at the
    last one. Returns the answer and the number of narrations."""
    last = stream.steps[-1]
    steps = list(stream.steps[:-1]) + [Step(last.media, last.frame, last.t, [Turn("", NEEDLE_QUESTION)])]
    events = run_stream(session, cache, Stream(steps, stream.segments, stream.kind, stream.needle))
    answers = [e for e in events if e.kind == "answer"]
    return (answers[-1].text if answers else ""), sum(e.kind == "response" for e in events)


@torch.no_grad()
def run_needle_silent(session: StreamingSession, cache: FeatureCache, stream: Stream, question: str = NEEDLE_QUESTION,
                      upto: int | None = None) -> str:
    """A silent haystack (``fast_forward``: no gate, chunked prefill, the layout of a stream where the
    model stayed silent), then the last frame with ``question`` due. ``upto``: ask after the first
    ``upto`` steps instead of the last one. Returns the answer."""
    if upto is not None:
        stream = Stream(stream.steps[:upto], stream.segments, stream.kind, stream.needle)
    feats = stream_features(cache, stream)
    session.fast_forward([s.t for s in stream.steps[:-1]], feats[:-1])
    last = stream.steps[-1]
    session.ask(question, last.t)
    answers = [e for e in session.push_frame(last.t, feats[-1]) if e.kind == "answer"]
    return answers[-1].text if answers else ""
