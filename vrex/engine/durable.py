"""Durable sessions: a ``StreamingSession`` kept on disk as it goes, resumed exactly after a crash.

How (the format is in :mod:`vrex.engine.persist`):

* The first ``save(dir)`` writes a **checkpoint**: the whole state at that moment (every layer's K/V
  in arrival order, the policy's ``state_dict``, the stream state). ``vrex run --session`` saves
  right after the system prompt, so its checkpoint holds 48 tokens.
* From then on a **journal** records what each forward step stored: the keys and values exactly
  as the cache handed them to ``store_block`` (before any storage rounding), per layer in the
  policy's cluster-contiguous order together with that order. Every later ``save()`` appends the
  journal since the previous save as one log record (plus the small stream state after it) and
  then rewrites the manifest atomically: per-frame cost = what the frame added.
* ``load`` rebuilds the checkpoint, then **replays** every log record through the same code the live
  step ran: ``_next_positions`` (so position re-indexing happens at the same step),
  ``cache.store_block`` per span (so the policy indexes the same keys in the same order and the
  store places the same blocks in the same tiers), then the policy's evictions. The policy's state
  is never serialised step by step: it is recomputed, bit for bit, and checked: each replayed
  block's cluster order must equal the one recorded. The result is the live session's state, so a
  resumed greedy stream produces exactly the events the uninterrupted one does.

Settings (model fingerprint, policy and its parameters, the session config and the caller's run
settings) are in the manifest; ``load`` refuses a directory whose settings differ, naming them.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vrex.engine.persist import (
    CHECKPOINT, FORMAT, LOG, MANIFEST, LogAppender, SessionDamagedError, SessionMismatchError, SessionSaveError,
    crash_point, encode, file_crc, frame_record, read_manifest, read_records, save_error, write_atomic, write_manifest,
)
from vrex.engine.stream_state import StreamState

if TYPE_CHECKING:
    from vrex.engine.session import StreamingSession


# -- settings ---------------------------------------------------------------------------------
def model_fingerprint(model) -> dict[str, Any]:
    """What identifies the model's numbers: its description, shapes and a checksum of the weights a
    different model would differ in (connector, token embeddings' first rows, first layer)."""
    lm = model.lm
    crc = 0
    tensors = [p for _, p in sorted(model.connector.state_dict().items())] if hasattr(model.connector, "state_dict") else []
    emb = lm.get_input_embeddings().weight
    tensors += [emb[:256], next(iter(lm.base_model.layers[0].parameters()))]  # base_model: lm.model, GPT-NeoX's lm.gpt_neox
    for t in tensors:
        crc = zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), crc)
    cfg = getattr(lm.config, "text_config", None) or lm.config
    return {"describe": model.describe(), "tokens_per_frame": int(model.tokens_per_frame),
            "layers": int(cfg.num_hidden_layers), "vocab": int(cfg.vocab_size), "weights_crc32": crc}


def session_settings(session: "StreamingSession", extra: dict[str, Any] | None) -> dict[str, Any]:
    config = dataclasses.asdict(session.config)
    return {"model": model_fingerprint(session.model),
            "policy": {"name": session.policy.name, "params": _plain(session.policy.params())},
            "config": _plain(config), "run": _plain(extra or {})}


def _plain(x):
    """JSON's view of a value (tuples as lists), so saved and given settings compare equal."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def settings_diff(saved: Any, given: Any, path: str = "") -> list[str]:
    """Human lines naming each setting that differs: ``policy.params.ratio: saved 0.3, given 0.2``."""
    if isinstance(saved, dict) and isinstance(given, dict):
        out = []
        for k in sorted(set(saved) | set(given)):
            out += settings_diff(saved.get(k, "<unset>"), given.get(k, "<unset>"), f"{path}.{k}" if path else k)
        return out
    return [] if saved == given else [f"{path}: saved {saved!r}, given {given!r}"]


# -- the journal --------------------------------------------------------------------------------
class Journal:
    """What each forward step stored since the last save (see the module docstring)."""

    def __init__(self, session: "StreamingSession"):
        self.session = session
        self.steps: list[dict[str, Any]] = []
        self._blocks: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        cache = session.cache
        # the cache's own method, not a previous journal's wrapper (a session saved to a second directory)
        inner = getattr(cache, "_unjournaled_store_block", None) or cache.store_block
        cache._unjournaled_store_block = inner

        def store_block(layer, keys, values, frame_id):
            crash_point("store_block")  # tests: a kill in the middle of a step's layers
            start = inner(layer, keys, values, frame_id)
            self._blocks.append((layer, keys, values, _block_order(session, layer, start, keys.shape[1])))
            return start

        cache.store_block = store_block  # instance attribute: the cache's own calls go through it

    def end_step(self, n: int, spans: list[tuple[int, int | None]]) -> None:
        """Group the blocks the step stored: K/V ``[layers, H, n, D]`` in each block's stored order."""
        blocks, self._blocks = self._blocks, []
        L = self.session.store.num_layers
        per_layer: list[list] = [[] for _ in range(L)]
        for layer, k, v, order in blocks:
            per_layer[layer].append((k, v, order))
        ks, vs, orders = [], [], []
        for layer in range(L):
            if len(per_layer[layer]) != len(spans):
                raise RuntimeError(f"journal: layer {layer} stored {len(per_layer[layer])} blocks for {len(spans)} spans")
            parts_k, parts_v, parts_o = [], [], []
            for k, v, order in per_layer[layer]:
                if order is None:
                    order = torch.arange(k.shape[1]).expand(k.shape[0], -1)
                idx = order.to(k.device).unsqueeze(-1).expand(-1, -1, k.shape[-1])
                parts_k.append(k.gather(1, idx))
                parts_v.append(v.gather(1, idx))
                parts_o.append(order.to(torch.int32))
            ks.append(torch.cat(parts_k, 1))
            vs.append(torch.cat(parts_v, 1))
            orders.append(torch.cat(parts_o, 1))
        self.steps.append({"n": n, "spans": [list(s) for s in spans], "k": torch.stack(ks).cpu(),
                           "v": torch.stack(vs).cpu(), "order": torch.stack(orders)})


def _block_order(session: "StreamingSession", layer: int, start: int, length: int) -> torch.Tensor | None:
    specs = getattr(session.cache, "specs", None)
    if specs is not None and specs[layer].sliding:
        return None
    fn = getattr(session.policy, "block_order", None)
    return fn(layer, start, length) if fn is not None and length > 1 else None


# -- saving -------------------------------------------------------------------------------------
class Durable:
    """A session's link to its directory: the log appender, the manifest, the journal."""

    def __init__(self, session: "StreamingSession", directory: Path, manifest: dict[str, Any]):
        self.session, self.dir, self.manifest = session, directory, manifest
        self.log = LogAppender(directory / LOG, manifest["log"]["bytes"])
        self.journal = Journal(session)
        self.dialogue_saved = len(session.state.dialogue)
        self.last_save_ms: float | None = None
        self.last_save_bytes = 0

    def save(self) -> None:
        """Append the journal since the last save as one record, then commit it in the manifest."""
        s = self.session
        t0 = time.perf_counter()
        body = {"steps": self.journal.steps, "state": s.state.small(), "rng": _rng_state(s),
                "dialogue": s.state.dialogue[self.dialogue_saved :], "cached_tokens": s.cached_tokens}
        record = frame_record(encode(body))
        try:
            committed = self.log.append(record)
            crash_point("manifest")  # tests: the log is durable, the manifest not yet
            manifest = {**self.manifest, "log": {"bytes": committed, "records": self.manifest["log"]["records"] + 1},
                        "frames": s.frames, "t": s.t, "cached_tokens": s.cached_tokens, "saved_at": time.time()}
            write_manifest(self.dir, manifest)
        except OSError as e:
            raise save_error(self.dir, f"frame {s.frames}", e) from e
        self.manifest = manifest
        self.log.committed = committed
        self.journal.steps = []
        self.dialogue_saved = len(s.state.dialogue)
        self.last_save_ms, self.last_save_bytes = 1e3 * (time.perf_counter() - t0), len(record)

    def close(self) -> None:
        self.log.close()


def _rng_state(session) -> torch.Tensor | None:
    return session._rng.get_state() if session.config.sample else None


def create(session: "StreamingSession", directory: Path, extra: dict[str, Any] | None) -> Durable:
    """Write a checkpoint of ``session`` into a new (or empty) directory and start its journal."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if any(directory.iterdir()):
            raise SessionMismatchError(f"session '{directory}': the directory is not empty; save a new session into a new or empty directory")
        store = session.store
        # the checkpoint holds one position frame: a spread re-index finishes first (replay runs from here)
        session.cache.finish_reindex()
        kv = [{"k": layer.keys().cpu(), "v": layer.values().cpu(), "evicted": layer.is_evicted()} for layer in store.layers]
        body = {"state": session.state.to_dict(), "policy": session.policy.state_dict(), "kv": kv, "rng": _rng_state(session),
                "window_lo": [getattr(layer, "window_lo", 0) for layer in session.cache.layers]}
        data = frame_record(encode(body))
        write_atomic(directory / CHECKPOINT, data)
        (directory / LOG).touch()
        manifest = {"format": FORMAT, "settings": session_settings(session, extra),
                    "checkpoint": {"bytes": len(data), "crc32": zlib.crc32(data)}, "log": {"bytes": 0, "records": 0},
                    "frames": session.frames, "t": session.t, "cached_tokens": session.cached_tokens, "saved_at": time.time()}
        write_manifest(directory, manifest)
    except OSError as e:
        raise save_error(directory, "the checkpoint", e) from e
    return Durable(session, directory, manifest)


# -- loading ------------------------------------------------------------------------------------
def open_manifest(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise SessionDamagedError(f"session '{directory}': no such directory")
    return read_manifest(directory)


def load(cls, directory: Path, model, *, policy=None, config=None, extra: dict[str, Any] | None = None, trace=None,
         check_extra: bool = True) -> "StreamingSession":
    """Rebuild the session saved in ``directory`` (see the module docstring). ``policy``/``config``
    default to the saved ones; given, they must equal them, as must the model and ``extra``."""
    from vrex.engine.config import SessionConfig
    from vrex.engine.positions import PositionConfig
    from vrex.kv.policies import make_policy

    directory = Path(directory)
    manifest = open_manifest(directory)
    saved = manifest["settings"]
    if isinstance(saved.get("config", {}).get("positions"), dict):
        saved["config"]["positions"].setdefault("spread", 1)  # saved before spread existed: re-indexed at once
    if policy is None:
        policy = make_policy(saved["policy"]["name"], **saved["policy"]["params"])
    if config is None:
        cfg = dict(saved["config"])
        cfg["positions"] = PositionConfig(**cfg["positions"])
        config = SessionConfig(**cfg)
    probe = _SettingsProbe(model, policy, config)
    given = session_settings(probe, extra if check_extra else saved["run"])  # type: ignore[arg-type]
    diff = settings_diff(saved, given)
    if diff:
        raise SessionMismatchError(f"session '{directory}' was saved with other settings: " + "; ".join(diff))
    cp = directory / CHECKPOINT
    if not cp.exists() or cp.stat().st_size < manifest["checkpoint"]["bytes"] or \
            file_crc(cp, manifest["checkpoint"]["bytes"]) != manifest["checkpoint"]["crc32"]:
        raise SessionDamagedError(f"session '{directory}': {CHECKPOINT} is missing or fails its checksum")
    (checkpoint,) = read_records(cp, manifest["checkpoint"]["bytes"])
    log_path = directory / LOG
    if not log_path.exists():
        raise SessionDamagedError(f"session '{directory}': {LOG} is missing")
    records = read_records(log_path, manifest["log"]["bytes"])
    if len(records) != manifest["log"]["records"]:
        raise SessionDamagedError(f"session '{directory}': {LOG} holds {len(records)} records, its manifest says {manifest['log']['records']}")
    device = model.device
    state = StreamState.from_dict(checkpoint["state"], device)
    kv = checkpoint["kv"]
    session = cls.from_state(model, policy, config, state, lambda layer: (kv[layer]["k"], kv[layer]["v"], kv[layer]["evicted"]),
                             policy_state=checkpoint["policy"], trace=trace)
    if checkpoint.get("window_lo"):
        for layer, lo in zip(session.cache.layers, checkpoint["window_lo"]):
            layer.window_lo = int(lo)
    if checkpoint.get("rng") is not None:
        session._rng.set_state(checkpoint["rng"])
    for i, record in enumerate(records):
        for step in record["steps"]:
            replay_step(session, step, where=f"session '{directory}', record {i}")
        session.state.set_small(record["state"], device)
        session.state.dialogue += [dict(d) for d in record["dialogue"]]
        if record.get("rng") is not None:
            session._rng.set_state(record["rng"])
        if session.cached_tokens != record["cached_tokens"]:
            raise SessionDamagedError(f"session '{directory}', record {i}: replay gives {session.cached_tokens} cached tokens, "
                                      f"the save had {record['cached_tokens']}")
    session._durable = Durable(session, directory, manifest)
    return session


class _SettingsProbe:
    """Just enough of a session for ``session_settings`` before the session exists."""

    def __init__(self, model, policy, config):
        self.model, self.policy, self.config = model, policy, config


def replay_step(session: "StreamingSession", step: dict[str, Any], where: str) -> None:
    """Redo one recorded forward step without the model (see the module docstring)."""
    n, spans = int(step["n"]), [(int(a), None if b is None else int(b)) for a, b in step["spans"]]
    k_all, v_all, o_all = step["k"], step["v"], step["order"]
    device = session.store.device
    positions = session._next_positions(n)
    cache = session.cache
    specs = getattr(cache, "specs", None)
    for layer in range(session.store.num_layers):
        off = 0
        for length, fid in spans:
            order = o_all[layer, :, off : off + length].to(torch.int64)
            inv = torch.argsort(order, dim=1).to(device).unsqueeze(-1)
            kp, vp = k_all[layer, :, off : off + length].to(device), v_all[layer, :, off : off + length].to(device)
            keys, values = kp.gather(1, inv.expand_as(kp)), vp.gather(1, inv.expand_as(vp))
            start = cache.store_block(layer, keys, values, fid)
            mine = _block_order(session, layer, start, length)
            if mine is not None and not torch.equal(mine, order):
                raise SessionDamagedError(f"{where}: replay diverged at layer {layer}, tokens {start}..{start + length - 1}: "
                                          "the policy clusters them differently than the saved run did")
            off += length
        if specs is None or not specs[layer].sliding:
            evict = session.policy.evictable(layer, session.store.layers[layer].length)
            if evict is not None and evict.numel():
                session.store.layers[layer].evict(evict)
    start = session.cached_tokens
    session.state.positions = torch.cat([session.state.positions, positions])
    session.state.stored_at = torch.cat([session.state.stored_at, positions])
    for length, fid in spans:
        session.state.spans.append((start, length, fid))
        start += length


def is_session_dir(directory: Path) -> bool:
    return (Path(directory) / MANIFEST).exists()


__all__ = ["Durable", "Journal", "create", "load", "replay_step", "open_manifest", "session_settings", "settings_diff",
           "model_fingerprint", "is_session_dir", "SessionSaveError"]

