""""What did it look at": which past tokens each layer and KV head read while the model answered.

Two pieces:

* ``ReadRecorder`` wraps any ``KVPolicy`` (the KV contract in ``vrex.kv.policy``): it delegates
  everything to the real policy and remembers what ``select()`` returned in text/decode steps.
  The cache adds the always-kept ranges (sink + recent window, ``VrexCache.keep``) on top of a
  selection, so the recorder adds them too; ``None`` means "every past token".
* ``ReadTimeline`` turns those per-layer, per-head index lists into read counts per frame, per
  generation (a narration or an answer: its prompt step plus every decoded token), and finally
  into shares: of each frame's tokens, the fraction read, averaged over steps, layers and heads.

Interface (``read_counts``) is the one the cache's own hook would feed: per step, per layer,
``(n_past, indices)`` with ``indices`` a list per KV head of int tensors or ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vrex.kv.policy import Selection, Stage

#: Key of the per-layer entry of ``StepRecord.layers`` through which the cache may report what it read
#: (a list per KV head of int tensors after the always-kept union, or None for every past token).
#: Until the cache reports it, ``ReadRecorder`` reconstructs the same thing from the policy's selection.
CACHE_HOOK = "read_indices"


class ReadRecorder:
    """A KV policy that delegates to ``inner`` and records the selections of non-frame steps.

    Frame steps are not recorded (the timeline is about answers and narrations), which keeps the
    recorder's cost off the per-frame path.
    """

    def __init__(self, inner: Any):
        self._inner = inner
        self.step: list[tuple[int, int, list[torch.Tensor] | None]] = []  # (layer, n_past, indices)

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes this wrapper lacks: name, offloads, setup, on_append, block_order...
        if name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)

    def select(self, layer: int, queries: torch.Tensor, n_past: int, stage: Stage) -> Selection:
        selection = self._inner.select(layer, queries, n_past, stage)
        if stage != "frame":
            self.step.append((layer, n_past, selection.indices))
        return selection

    def select_packed(self, layer: int, queries: torch.Tensor, n_past: int, stage: Stage, want_stats: bool = False) -> Any:
        """The cache's fast path asks for a packed selection (``PackedSelection``: ids + per-head offsets)."""
        packed = self._inner.select_packed(layer, queries, n_past, stage, want_stats=want_stats)
        if stage != "frame":
            offs = packed.offs.tolist()
            indices = None if packed.everything else [packed.ids[offs[h]:offs[h + 1]] for h in range(len(offs) - 1)]
            self.step.append((layer, n_past, indices))
        return packed

    def take_step(self) -> list[tuple[int, int, list[torch.Tensor] | None]]:
        step, self.step = self.step, []
        return step


def with_kept(indices: list[torch.Tensor] | None, n_past: int, sink: int, recent: int, num_heads: int) -> torch.Tensor:
    """Boolean ``[H, n_past]``: tokens read per KV head = selection + sink + recent window (as the cache reads)."""
    if indices is None:
        return torch.ones(num_heads, n_past, dtype=torch.bool)
    mask = torch.zeros(len(indices), n_past, dtype=torch.bool)
    for h, idx in enumerate(indices):
        mask[h, idx.cpu().long()] = True
    mask[:, : min(sink, n_past)] = True
    if recent:
        mask[:, max(0, n_past - recent):] = True
    return mask


def read_counts(mask: torch.Tensor, group_of: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``[H, n_groups]`` tokens read per group (frame) from a read mask ``[H, n_past]`` and each
    token's group id ``group_of`` (``-1``: not a frame, e.g. question or answer text)."""
    groups = group_of[: mask.shape[1]]
    in_frame = groups >= 0
    out = torch.zeros(mask.shape[0], n_groups, dtype=torch.float64)
    out.index_add_(1, groups[in_frame], mask[:, in_frame].to(torch.float64))
    return out


@dataclass
class Generation:
    """Read counts of one narration/answer: ``counts`` [layers, heads, frames] summed over its steps."""

    counts: torch.Tensor
    steps: int = 0


class ReadTimeline:
    """Accumulates read counts per generation; plug ``on_step`` into ``StreamingSession.trace``."""

    def __init__(self, recorder: ReadRecorder, keep: Any, num_layers: int, num_heads: int):
        self.recorder, self.keep = recorder, keep
        self.num_layers, self.num_heads = num_layers, num_heads
        self.group_of = torch.empty(0, dtype=torch.long)  # frame id of every cached token, -1 for text
        self.frame_tokens = torch.empty(0, dtype=torch.float64)  # tokens per frame id
        self._spans_seen = 0
        self.current: Generation | None = None
        self.finished: list[Generation] = []

    def sync_spans(self, spans: list[tuple[int, int, int | None]]) -> None:
        """Extend the token -> frame map with the session's new ``(start, length, frame_id)`` spans."""
        new = spans[self._spans_seen:]
        if not new:
            return
        parts = [self.group_of]
        n_frames = self.frame_tokens.numel()
        for _, length, fid in new:
            parts.append(torch.full((length,), -1 if fid is None else fid, dtype=torch.long))
            if fid is not None:
                n_frames = max(n_frames, fid + 1)
        self.group_of = torch.cat(parts)
        sizes = torch.zeros(n_frames, dtype=torch.float64)
        sizes[: self.frame_tokens.numel()] = self.frame_tokens
        for _, length, fid in new:
            if fid is not None:
                sizes[fid] += length
        self.frame_tokens, self._spans_seen = sizes, len(spans)

    def on_step(self, record: Any, spans: list[tuple[int, int, int | None]]) -> None:
        """After each forward step: a ``text`` step opens a generation, ``decode`` steps add to it."""
        step = self.recorder.take_step()
        if record is None or record.stage == "frame":
            self.close()
            return
        self.sync_spans(spans)
        if record.stage == "text":
            self.close()
            self.current = Generation(torch.zeros(self.num_layers, self.num_heads, self.frame_tokens.numel(), dtype=torch.float64))
        if self.current is None:
            return
        n_groups = self.current.counts.shape[-1]
        sink, recent = self.keep.sink_tokens, self.keep.recent_tokens
        if record.layers and CACHE_HOOK in record.layers[0]:
            # The cache's own record (when it provides one) already holds sink + recent: use it as is.
            step, sink, recent = [(e["layer"], e["n_past"], e[CACHE_HOOK]) for e in record.layers], 0, 0
        for layer, n_past, indices in step:
            mask = with_kept(indices, n_past, sink, recent, self.num_heads)
            self.current.counts[layer] += read_counts(mask, self.group_of, n_groups)
        self.current.steps += 1

    def close(self) -> None:
        if self.current is not None:
            self.finished.append(self.current)
            self.current = None

    def take(self) -> list[Generation]:
        self.close()
        out, self.finished = self.finished, []
        return out

    def shares(self, gen: Generation) -> torch.Tensor:
        """``[layers, heads, frames]``: fraction of each frame's tokens read, averaged over the steps."""
        n = gen.counts.shape[-1]
        size = self.frame_tokens[:n].clamp(min=1)
        return gen.counts / (max(gen.steps, 1) * size)


def summarize(shares: torch.Tensor, frame_times: list[float], top: int = 4) -> dict[str, Any]:
    """JSON-ready timeline: per-frame share (mean over layers and heads) and the most-read frames."""
    mean = shares.mean(dim=(0, 1)) if shares.numel() else torch.zeros(0)
    frames = [{"frame": i, "t": round(frame_times[i], 3) if i < len(frame_times) else None, "share": round(float(s), 4)}
              for i, s in enumerate(mean.tolist())]
    ranked = sorted(frames, key=lambda f: -f["share"])[:top]
    return {"frames": frames, "top": [f for f in ranked if f["share"] > 0]}


def per_layer(shares: torch.Tensor) -> list[list[float]]:
    """``[layers][frames]`` shares averaged over KV heads (the per-layer view)."""
    return [[round(float(x), 4) for x in row] for row in shares.mean(dim=1).tolist()] if shares.numel() else []
