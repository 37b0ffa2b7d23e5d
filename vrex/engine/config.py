"""Settings of a streaming session (``SessionConfig``) and the defaults they fall back to.

Apart from the session so that modules the session itself uses (durable sessions) can read them
without importing the session.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vrex.engine.positions import PositionConfig

#: VideoLLM-online's demo threshold on P(interval token).
DEFAULT_THETA = 0.725


@dataclass
class SessionConfig:
    theta: float = DEFAULT_THETA
    #: Seconds after a narration during which the gate stays closed (questions are still answered).
    #: 0 = VideoLLM-online's behaviour (the gate alone decides).
    min_response_gap: float = 0.0
    max_response_tokens: int = 48
    max_answer_tokens: int = 64
    sample: bool = False  # False: greedy
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    #: Always-kept window of the newest tokens on top of the policy's selection. None: the last
    #: ``DEFAULT_RECENT_FRAMES`` frames with their interval tokens (``recent_window``); 0: the policy
    #: alone (how policies are compared bare). Why a default: ReKV and ReSV select by similarity to the
    #: current query, and without the frames just seen they lose narration and short-range answers
    #: (docs/train.md, accuracy per policy: bare, their narration scores fall far below full's; with
    #: the last two frames kept they match it).
    recent_tokens: int | None = None
    positions: PositionConfig = field(default_factory=PositionConfig)
    #: Device-tier budget. None: ``device_tokens`` tokens (all layers) for offloading policies
    #: (flexgen, infinigen, rekv, resv...), unbounded for resident ones (full, streamingllm).
    device_budget_bytes: int | None = None
    device_tokens: int = 2048
    host_budget_bytes: int | None = None
    disk_dir: str | None = None
    #: "fast": fused C++ selection + attention over the store (vrex.kv.fast); "reference": the PyTorch
    #: path it is tested against. Both compute the same selections.
    kernels: str = "fast"
    #: KV storage type: None = float32 on CPU (the type attention runs in there), the LM's type elsewhere;
    #: "bfloat16" halves KV memory (keys and values rounded).
    kv_dtype: str | None = None


DEFAULT_RECENT_FRAMES = 2


def recent_window(config: SessionConfig, tokens_per_frame: int) -> int:
    """The recent window in tokens: ``config.recent_tokens``, or two frames (each frame's tokens and
    the interval token after it) when it is None."""
    if config.recent_tokens is None:
        return DEFAULT_RECENT_FRAMES * (tokens_per_frame + 1)
    if config.recent_tokens < 0:
        raise ValueError(f"recent_tokens must be >= 0 or None, got {config.recent_tokens}")
    return config.recent_tokens
