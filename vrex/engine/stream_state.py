"""The stream state of a ``StreamingSession``, apart from its live loop (issue 16 item 2).

What the stream *is* at a frame boundary: where every cached token sits (positions, the spans of
the steps that stored them), the text owed to the next step, the frame clock, the questions still
to answer and what was said. The live loop (gate, questions, generation) reads and advances it;
``fork``, ``save`` and ``load`` build a session from it. The K/V and the policy's indexes are not
here: they live in the store and the policy (``vrex.kv``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class StreamState:
    #: position id of every cached token (re-indexed in place when the stream outgrows the window)
    positions: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    #: (first token, length, frame id or None) of every stored step: how blocks are rebuilt
    spans: list[tuple[int, int, int | None]] = field(default_factory=list)
    #: token ids owed to the next step (the interval token, or the text that resumes after a reply)
    pending: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    frames: int = 0
    t: float = 0.0
    last_response_t: float = -math.inf
    #: encoder features of the last frame (temporal connectors read the change since it)
    last_features: torch.Tensor | None = None
    #: heap of (time, order, question) not yet answered
    questions: list[tuple[float, int, str]] = field(default_factory=list)
    next_question: int = 0
    #: tokens of the system prompt (always attended)
    sink_tokens: int = 0
    #: what was said: {"t", "kind", "text"} (+ "question" for answers), in order
    dialogue: list[dict[str, Any]] = field(default_factory=list)
    #: position id each cached token was stored at (``positions`` before any re-index moved it): a
    #: fork's policy indexes every block at the positions it arrived at, as the stream's own policy did
    #: (``StreamingSession.from_state``)
    stored_at: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    def clone(self) -> "StreamState":
        return StreamState(
            self.positions.clone(), list(self.spans), self.pending.clone(), self.frames, self.t, self.last_response_t,
            None if self.last_features is None else self.last_features.clone(), list(self.questions),
            self.next_question, self.sink_tokens, [dict(d) for d in self.dialogue], self.stored_at.clone())

    def small(self) -> dict[str, Any]:
        """Everything but positions, stored_at, spans and dialogue (which a durable session rebuilds or appends):
        what one save records after its K/V blocks. Bounded per frame."""
        return {"pending": self.pending.cpu(), "frames": self.frames, "t": self.t, "last_response_t": self.last_response_t,
                "last_features": None if self.last_features is None else self.last_features.cpu(),
                "questions": [list(q) for q in self.questions], "next_question": self.next_question,
                "sink_tokens": self.sink_tokens}

    def set_small(self, d: dict[str, Any], device) -> None:
        self.pending = d["pending"].to(device)
        self.frames, self.t, self.last_response_t = int(d["frames"]), float(d["t"]), float(d["last_response_t"])
        self.last_features = None if d["last_features"] is None else d["last_features"].to(device)
        self.questions = [(float(t), int(i), str(q)) for t, i, q in d["questions"]]
        self.next_question, self.sink_tokens = int(d["next_question"]), int(d["sink_tokens"])

    def to_dict(self) -> dict[str, Any]:
        return {**self.small(), "positions": self.positions.cpu(), "spans": [list(s) for s in self.spans],
                "dialogue": [dict(d) for d in self.dialogue], "stored_at": self.stored_at.cpu()}

    @staticmethod
    def from_dict(d: dict[str, Any], device) -> "StreamState":
        state = StreamState(positions=d["positions"].clone(), spans=[(int(a), int(b), None if c is None else int(c)) for a, b, c in d["spans"]],
                            dialogue=[dict(x) for x in d["dialogue"]],
                            # saved before stored_at existed: the positions they have now (a fork indexes the
                            # blocks there, as every fork did before)
                            stored_at=(d["stored_at"] if "stored_at" in d else d["positions"]).clone())
        state.set_small(d, device)
        return state


__all__ = ["StreamState"]
