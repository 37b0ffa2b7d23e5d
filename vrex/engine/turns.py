"""Who speaks after a frame, apart from the session that runs the steps (issue 16 item 2).

After each frame step the live loop (``vrex.engine.session``) asks, in this order: is a question due
(:class:`QuestionQueue`: answered in time order by the first frame at or past its time)? If not, does
the streaming-EOS gate open (:func:`gate_opens`: P(interval) below ``theta``, outside the quiet gap
after the last narration)? Either way the reply is decoded token by token with :func:`next_token`
(greedy, or nucleus sampling from the session's seeded generator).

The questions themselves live in the ``StreamState`` (``questions``, ``next_question``), so saves,
loads and forks carry them; :class:`QuestionQueue` is a view that orders and pops them.
"""

from __future__ import annotations

import heapq
from typing import Any, Iterator

import torch

from vrex.engine.config import SessionConfig
from vrex.engine.stream_state import StreamState


class QuestionQueue:
    """The questions of ``state`` not yet answered: a heap of (time, order asked, text)."""

    def __init__(self, state: StreamState):
        self.state = state

    def __len__(self) -> int:
        return len(self.state.questions)

    def add(self, text: str, t: float) -> float:
        """Queue ``text`` for stream time ``t`` (seconds); returns ``t``. Same-time questions keep the order asked."""
        if not text.strip():
            raise ValueError("question text is empty")
        heapq.heappush(self.state.questions, (float(t), self.state.next_question, text))
        self.state.next_question += 1
        return float(t)

    def due(self, now: float) -> Iterator[tuple[float, str]]:
        """(time, text) of each question at or before ``now``, earliest first. Each is popped only when
        the caller asks for it, so a save between two answers still holds the unanswered ones."""
        while self.state.questions and self.state.questions[0][0] <= now:
            t, _, text = heapq.heappop(self.state.questions)
            yield t, text

    def rest(self) -> Iterator[tuple[float, str]]:
        """Every question left (the stream ended), earliest first, popped one at a time like :meth:`due`."""
        return self.due(float("inf"))


def late_answer_note(asked_t: float, stream_end_t: float) -> dict[str, Any]:
    """Stats of an answer given at the end of a stream that stopped before the time it was asked for."""
    if asked_t <= stream_end_t:
        return {}
    return {"note": f"asked for {asked_t:g} s; the stream ended at {stream_end_t:g} s, answered there", "asked_at": asked_t}


def interval_probability(logits: torch.Tensor, interval_id: int) -> float:
    """P(interval token) at a frame's last position: the model's own "nothing to say" (VideoLLM-online)."""
    return float(logits.float().softmax(-1)[interval_id])


def gate_opens(p_interval: float, t: float, last_response_t: float, config: SessionConfig) -> bool:
    """The streaming-EOS gate: narrate when P(interval) is below ``theta`` and the last narration is at
    least ``min_response_gap`` seconds old."""
    return p_interval < config.theta and t - last_response_t >= config.min_response_gap


def next_token(logits: torch.Tensor, config: SessionConfig, rng: torch.Generator) -> int:
    """The next token from one position's logits ``[V]``: argmax, or with ``config.sample`` a draw from
    the smallest set of tokens whose probability (at ``temperature``) reaches ``top_p``."""
    if not config.sample:
        return int(logits.argmax())
    probs = (logits.float() / config.temperature).softmax(-1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < config.top_p
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=rng)
    return int(order[choice])


__all__ = ["QuestionQueue", "late_answer_note", "interval_probability", "gate_opens", "next_token"]
