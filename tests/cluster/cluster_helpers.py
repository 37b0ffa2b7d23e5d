"""What the cluster tests share: the session settings and the reference of a session run alone."""

from __future__ import annotations

import os

from vrex.engine.session import SessionConfig, StreamingSession
from vrex.kv.policies import make_policy

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
CONFIG = {"theta": 1.0, "max_response_tokens": 3, "max_answer_tokens": 4}  # theta 1: speaks after every frame


def alone(videollm, policy: str, frames) -> list:
    """Events of the same session run in this process, without Ray: frames, then one question."""
    s = StreamingSession(videollm, make_policy(policy), SessionConfig(**CONFIG))
    events = [e.to_dict() for t, im in frames for e in s.push_frame(t, im)]
    return events + [e.to_dict() for e in s.ask("What do you see?")]


def texts(events) -> list:
    return [(e["kind"], e["text"], e["stats"].get("cached_tokens")) for e in events]
