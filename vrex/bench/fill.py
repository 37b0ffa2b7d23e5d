"""The shared start of ``vrex bench kv`` and ``vrex bench stream``: the model, one long real stream
encoded once, and one session filled to each cached-token size in turn; every policy of a size is
measured on a fork of it (``StreamingSession.fork``), on the same next frames.

The fill prefills 32 frames per forward. Each token attends to the whole past (``window=0``: exact,
quadratic in the stream's length: 64K tokens take about 40 minutes on 2 cores) or, with
``window=W``, to the prompt, the last ``W`` tokens before its chunk and its own chunk
(``streamingllm[evict=false]``: linear, 64K in a few minutes). Either way every token is kept and
every measured step is a real frame step over the whole cache; what the window changes is how the
cached keys and values of layers above the first were computed (each token saw its recent past,
not all of it), so rows say which fill made them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from vrex.bench.engine import encode_all
from vrex.bench.media import long_stream
from vrex.engine.session import SessionConfig, StreamingSession
from vrex.kv.policies import make_policy
from vrex.models.dtypes import DEFAULT_LM_DTYPE
from vrex.models.model import VideoLLM
from vrex.models.videollm import load_videollm


@dataclass
class Fill:
    """The shared ``full`` session (``base``) and the stream it reads from ``cursor`` on."""

    model: VideoLLM
    base: StreamingSession
    stream: list[tuple[float, Image.Image]]
    features: torch.Tensor  # encoder features of every frame of ``stream``
    cursor: int = 0
    window: int = 0  # 0: the fill attended to everything; W: to the prompt and the last W tokens

    def fill_to(self, size: int) -> float:
        """Prefill the next silent frames into ``base`` until it holds about ``size`` tokens; the seconds it took."""
        need = max(0, (size - self.base.cached_tokens) // (self.model.tokens_per_frame + 1))
        t0 = time.perf_counter()
        self.skip(need)
        return time.perf_counter() - t0

    def next_frames(self, n: int) -> list[tuple[float, Image.Image]]:
        """The ``n`` frames after ``base``'s last one (the measured steps of a size), not consumed."""
        return self.stream[self.cursor:self.cursor + n]

    def skip(self, n: int) -> None:
        """Prefill the next ``n`` frames into ``base`` (after measuring them on forks: the next size goes on from there)."""
        lo, self.cursor = self.cursor, self.cursor + n
        self.base.fast_forward([t for t, _ in self.stream[lo:self.cursor]], self.features[lo:self.cursor])


def open_fill(sizes: list[int], frames_per_size: int, *, lm: str, lm_dtype: str = DEFAULT_LM_DTYPE,
              kernels: str = "fast", window: int = 0, log: Callable[[str], None] = print) -> Fill:
    """Load the model (its notes to ``log``: another LM runs with an untrained connector), decode and encode
    enough real frames to reach the largest size plus ``frames_per_size`` measured frames per size.
    ``window``: 0 fills with full attention, ``W > 0`` with the prompt and the last ``W`` tokens."""
    if window < 0:
        raise ValueError(f"fill window must be 0 (full attention) or a number of tokens > 0, got {window}")
    model = load_videollm(lm=lm, lm_dtype=lm_dtype)
    for note in model.notes:
        log(f"note: {note}")
    n_frames = max(sizes) // (model.tokens_per_frame + 1) + (frames_per_size + 1) * len(sizes) + 8
    stream = long_stream(n_frames)
    # With a window: the last W tokens, nothing evicted; the prompt comes on top, as every step reads it
    # (vrex.kv.cache.KeepConfig.sink_tokens); no recent window beyond W.
    spec, recent = ("full", None) if not window else (f"streamingllm[sink=0,window={window},evict=false]", 0)
    base = StreamingSession(model, make_policy(spec), SessionConfig(theta=0.0, kernels=kernels, recent_tokens=recent))
    return Fill(model, base, stream, encode_all(model, stream), window=window)
