"""Who speaks after a frame (vrex/engine/turns.py): the question queue, the streaming-EOS gate and the
next-token rule, without a model (the session tests run them on the real one)."""

from __future__ import annotations

import math

import pytest
import torch

from vrex.engine.config import SessionConfig
from vrex.engine.stream_state import StreamState
from vrex.engine.turns import QuestionQueue, gate_opens, interval_probability, late_answer_note, next_token


def test_questions_come_due_in_time_then_asked_order():
    state = StreamState()
    queue = QuestionQueue(state)
    for text, t in [("late", 5.0), ("b", 2.0), ("a", 1.0), ("b2", 2.0)]:
        queue.add(text, t)
    assert list(queue.due(2.0)) == [(1.0, "a"), (2.0, "b"), (2.0, "b2")]
    assert len(queue) == 1 and state.questions == [(5.0, 0, "late")]  # the queue is the stream state's
    assert list(queue.due(4.9)) == []
    assert list(queue.rest()) == [(5.0, "late")] and len(queue) == 0
    with pytest.raises(ValueError, match="empty"):
        queue.add("  ", 1.0)


def test_due_pops_one_question_at_a_time():
    """A save between two answers must still hold the question not yet answered."""
    state = StreamState()
    queue = QuestionQueue(state)
    queue.add("first", 1.0)
    queue.add("second", 1.0)
    due = queue.due(3.0)
    assert next(due) == (1.0, "first")
    assert [q for _, _, q in state.questions] == ["second"]
    assert state.clone().questions == [(1.0, 1, "second")]


def test_late_answer_note():
    assert late_answer_note(3.0, 3.0) == {}
    assert late_answer_note(7.5, 3.0) == {"note": "asked for 7.5 s; the stream ended at 3 s, answered there", "asked_at": 7.5}


def test_gate_reads_theta_and_the_quiet_gap():
    config = SessionConfig(theta=0.5, min_response_gap=2.0)
    assert gate_opens(0.4, 10.0, -math.inf, config)
    assert not gate_opens(0.5, 10.0, -math.inf, config)  # at theta the model stays silent
    assert not gate_opens(0.1, 10.0, 8.5, config)  # narrated 1.5 s ago
    assert gate_opens(0.1, 10.0, 8.0, config)
    logits = torch.tensor([0.0, math.log(3.0)])
    assert interval_probability(logits, 1) == pytest.approx(0.75)


def test_next_token_greedy_and_nucleus_sampling():
    logits = torch.log(torch.tensor([0.05, 0.6, 0.3, 0.05]))
    assert next_token(logits, SessionConfig(), torch.Generator()) == 1
    nucleus = SessionConfig(sample=True, temperature=1.0, top_p=0.8)  # keeps tokens 1 and 2 (0.6 + 0.3 reach 0.8)
    draws = [next_token(logits, nucleus, g) for g in [torch.Generator().manual_seed(0)] for _ in range(200)]
    assert set(draws) == {1, 2}
    again = [next_token(logits, nucleus, g) for g in [torch.Generator().manual_seed(0)] for _ in range(200)]
    assert draws == again
