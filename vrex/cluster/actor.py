"""The Ray actor behind ``vrex.cluster``: one batched engine (``vrex.engine.batch``) with its own
copy of the model, holding any number of sessions. Plain Python here; ``vrex.cluster.client`` wraps
it with ``ray.remote``, so this module imports without Ray."""

from __future__ import annotations

import os
import socket
from typing import Any

from PIL import Image


class EngineActor:
    """One model and one ``BatchEngine`` per actor (a process Ray places on any node)."""

    def __init__(self, threads: int | None = None, connector: str | None = "auto",
                 device_budget_bytes: int | None = None, max_streams: int = 8):
        import torch

        from vrex.engine.batch import BatchEngine
        from vrex.models.videollm import load_videollm

        if threads:
            torch.set_num_threads(threads)
        self.model = load_videollm(connector=connector)
        self.engine = BatchEngine(self.model, device_budget_bytes=device_budget_bytes, max_streams=max_streams)

    def where(self) -> dict[str, Any]:
        """Node and process of this actor (for placement checks and error messages)."""
        return {"host": socket.gethostname(), "pid": os.getpid(), "streams": sorted(self.engine.streams)}

    def open(self, sid: str, policy: str, config: dict | None = None) -> dict[str, Any]:
        from vrex.engine.session import SessionConfig
        from vrex.kv.policies import make_policy

        self.engine.add_stream(sid, make_policy(policy), SessionConfig(**(config or {})))
        return {"id": sid, "cached_tokens": self.engine.streams[sid].cached_tokens, **self.where()}

    def close(self, sid: str) -> None:
        self.engine.remove_stream(sid)

    def step(self, frames: dict[str, tuple[float, Image.Image]]) -> dict[str, list[dict]]:
        """A frame for each named session, stepped together; events as dicts. A session whose step
        raised gets ``[{"kind": "error", ...}]`` (the others' events stand)."""
        from vrex.engine.batch import StreamStepError

        try:
            out = self.engine.step(frames)
        except StreamStepError as e:
            out = dict(e.results)
            return {**{sid: [ev.to_dict() for ev in evs] for sid, evs in out.items()},
                    **{sid: [_error(err)] for sid, err in e.errors.items()}}
        return {sid: [ev.to_dict() for ev in evs] for sid, evs in out.items()}

    def ask(self, questions: dict[str, tuple[str, float | None]]) -> dict[str, list[dict]]:
        from vrex.engine.batch import StreamStepError

        try:
            out = self.engine.ask(questions)
        except StreamStepError as e:
            return {**{sid: [ev.to_dict() for ev in evs] for sid, evs in e.results.items()},
                    **{sid: [_error(err)] for sid, err in e.errors.items()}}
        return {sid: [ev.to_dict() for ev in evs] for sid, evs in out.items()}

    def memory(self) -> dict[str, Any]:
        return self.engine.memory()


def _error(err: BaseException) -> dict[str, Any]:
    return {"t": None, "kind": "error", "text": f"{type(err).__name__}: {err}", "stats": {}}
