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

    def open(self, sid: str, policy: str, config: dict | None = None, save_dir: str | None = None,
             run_settings: dict | None = None) -> dict[str, Any]:
        """A new session; with ``save_dir`` it is saved there at once and after each of its steps
        (``vrex.engine.durable``), so ``resume`` can rebuild it in another actor if this one dies.
        ``run_settings``: the caller's own settings, kept in the save's manifest (``vrex serve``'s)."""
        from vrex.engine.session import SessionConfig
        from vrex.kv.policies import make_policy

        session = self.engine.add_stream(sid, make_policy(policy), SessionConfig(**(config or {})))
        if save_dir is not None:
            try:
                session.save(save_dir, {"cluster": {"policy": policy}, **(run_settings or {})})
            except BaseException:
                self.engine.remove_stream(sid)
                raise
        return {"id": sid, "cached_tokens": session.cached_tokens, **self.where()}

    def resume(self, sid: str, save_dir: str) -> dict[str, Any]:
        """Session ``sid`` rebuilt from its last save in ``save_dir`` (policy and config as saved), a
        stream of this actor's engine from now on; where it stands (``frame``, ``t``, ``cached_tokens``)."""
        from vrex.engine.session import StreamingSession

        if sid in self.engine.streams:  # reloading a session of this actor (its last step failed)
            self.engine.remove_stream(sid)
        self.engine.attach(sid, StreamingSession.load(save_dir, self.model))
        s = self.engine.streams[sid]
        return {"id": sid, "frame": s.frames, "t": s.t, "cached_tokens": s.cached_tokens, **self.where()}

    def close(self, sid: str, remove_dir: str | None = None) -> None:
        """Stop session ``sid`` (its files closed); ``remove_dir``: its saved directory, removed too."""
        import shutil

        self.engine.remove_stream(sid).close()
        if remove_dir is not None:
            shutil.rmtree(remove_dir, ignore_errors=True)

    def step(self, frames: dict[str, tuple[float, Image.Image]]) -> dict[str, list[dict]]:
        """A frame for each named session, stepped together; events as dicts. A session whose step
        raised gets ``[{"kind": "error", ...}]`` (the others' events stand)."""
        from vrex.engine.batch import StreamStepError

        try:
            out, errors = self.engine.step(frames), {}
        except StreamStepError as e:
            out, errors = dict(e.results), dict(e.errors)
        return self._saved(out, errors)

    def ask(self, questions: dict[str, tuple[str, float | None]]) -> dict[str, list[dict]]:
        from vrex.engine.batch import StreamStepError

        try:
            out, errors = self.engine.ask(questions), {}
        except StreamStepError as e:
            out, errors = dict(e.results), dict(e.errors)
        return self._saved(out, errors)

    def _saved(self, out: dict, errors: dict) -> dict[str, list[dict]]:
        """Events as dicts; each saved session that stepped is saved first (a failed save is that
        session's error: its directory keeps the last good save)."""
        for sid in list(out):
            session = self.engine.streams[sid]
            if session.saved_frames is not None:
                try:
                    session.save()
                except OSError as e:  # SessionSaveError names the directory and why
                    errors[sid] = e
                    del out[sid]
        return {**{sid: [ev.to_dict() for ev in evs] for sid, evs in out.items()},
                **{sid: [_error(err)] for sid, err in errors.items()}}

    def memory(self) -> dict[str, Any]:
        return self.engine.memory()


def _error(err: BaseException) -> dict[str, Any]:
    return {"t": None, "kind": "error", "text": f"{type(err).__name__}: {err}", "stats": {}}
