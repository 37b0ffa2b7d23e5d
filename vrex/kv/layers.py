"""What each attention layer of a causal LM is: full or sliding (its window), and its RoPE.

Read from the transformers model and its config, once per session, so the cache and position
re-indexing follow the model layer by layer instead of assuming one Llama-shaped layer:

* ``config.layer_types`` (``"full_attention"`` / ``"sliding_attention"``; Gemma 2/3, Qwen2 with
  ``use_sliding_window``, Mistral-style configs) or, without it, a config-wide ``sliding_window``
  (Mistral, Phi-3: every layer slides). transformers masks a sliding layer so that the query at
  index ``i`` sees keys ``j`` with ``i - window < j <= i`` (``masking_utils.sliding_window_overlay``).
* RoPE per layer: the model's rotary module(s) (``inv_freq``; Gemma 3 keeps one per layer type,
  ``{layer_type}_inv_freq``, base 10K local and 1M global). ``2 * len(inv_freq)`` is the rotary
  width: GPT-NeoX and Phi rotate only the first ``partial_rotary_factor * head_dim`` dimensions.
* How RoPE pairs the dimensions it rotates: half-split (``rotate_half``: dimension ``i`` with
  ``i + R/2``; Llama, Qwen2, Mistral, Gemma, Phi, GPT-NeoX) or interleaved pairs (``2i`` with
  ``2i + 1``; Cohere, GLM, Helium, GPT-J). Nothing in the config says which, so it is measured on the
  model itself (``rope_layouts``): RoPE attention sees only relative positions, so a forward at
  positions shifted by ``s`` gives every layer the keys of the unshifted forward rotated by ``s``;
  the layout whose rotation reproduces them is the model's.

``model_geometry`` and ``layer_specs`` raise :class:`UnsupportedModel`, whose message names the
capability the engine lacks (not the model type), for what the engine cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from weakref import WeakKeyDictionary

import torch

FULL, SLIDING = "full_attention", "sliding_attention"
#: RoPE types whose frequencies do not depend on the sequence length, so a stored key can be moved
#: to another position exactly (``vrex.engine.positions.rerotate``).
STATIC_ROPE = ("default", "linear", "llama3", "yarn", "proportional")
#: RoPE layouts (which dimensions rotate together): ``i`` with ``i + R/2``, or ``2i`` with ``2i + 1``
HALF, PAIRS = "half", "pairs"
ROPE_LAYOUTS = (HALF, PAIRS)


class UnsupportedModel(ValueError):
    """The LM needs something vrex's engine does not do; the message names that capability."""


@dataclass(frozen=True)
class LayerSpec:
    """One attention layer as the cache sees it."""

    index: int
    #: None: full attention; else the sliding window in tokens (the query sees itself and window - 1 before it)
    window: int | None = None
    #: RoPE inverse frequencies of this layer [rotary_dim / 2] (None: no RoPE found)
    inv_freq: torch.Tensor | None = None
    #: the RoPE type (``rope_type``); re-indexing needs one of ``STATIC_ROPE``
    rope_type: str = "default"
    #: how this layer's RoPE pairs dimensions (``HALF`` or ``PAIRS``, measured by ``rope_layouts``);
    #: None: neither reproduces the model's keys, so stored keys cannot be moved (no re-indexing)
    rope_layout: str | None = HALF

    @property
    def sliding(self) -> bool:
        return self.window is not None

    @property
    def kind(self) -> str:
        return SLIDING if self.sliding else FULL

    @cached_property
    def rope_key(self) -> tuple:
        """What this layer's rotation depends on (layout, frequencies), hashable: layers with one key share
        their sines and cosines during a re-index (``vrex.kv.cache``)."""
        return (self.rope_layout, None if self.inv_freq is None else tuple(self.inv_freq.tolist()))


@dataclass(frozen=True)
class Geometry:
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int


def text_config(config):
    """The language model's config (multimodal configs such as Gemma 3's nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_geometry(lm) -> Geometry:
    """Layers and heads of the KV cache, from the config (GPT-NeoX has no ``num_key_value_heads``:
    every query head has its own KV head)."""
    cfg = text_config(lm.config)
    try:
        layers, heads, hidden = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size
    except AttributeError as err:
        raise UnsupportedModel(f"the config has no {err.name}: vrex's KV cache needs the attention geometry "
                               f"(num_hidden_layers, num_attention_heads, hidden_size)") from err
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return Geometry(int(layers), int(heads), int(kv), int(head_dim))


def _layer_types(cfg) -> list[str]:
    n = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    if types:
        types = list(types)
        if len(types) != n:
            raise UnsupportedModel(f"config.layer_types has {len(types)} entries for {n} layers")
        return types
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return [SLIDING] * n  # Mistral, Phi-3: the config-wide window applies to every layer
    return [FULL] * n


def _rope_modules(lm) -> list[torch.nn.Module]:
    return [m for name, m in lm.named_modules()
            if any(b.endswith("inv_freq") and not b.endswith("original_inv_freq") for b, _ in m.named_buffers(recurse=False))]


def _inv_freq(module: torch.nn.Module, layer_type: str) -> torch.Tensor:
    per_type = getattr(module, f"{layer_type}_inv_freq", None)
    return per_type if per_type is not None else module.inv_freq


def _rope_type(cfg, layer_type: str) -> str:
    params = getattr(cfg, "rope_parameters", None) or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    return str(params.get("rope_type", "default")) if isinstance(params, dict) else "default"


def layer_specs(lm) -> list[LayerSpec]:
    """One :class:`LayerSpec` per decoder layer of ``lm`` (a transformers causal LM)."""
    cfg = text_config(lm.config)
    types = _layer_types(cfg)
    other = sorted({t for t in types if t not in (FULL, SLIDING)})
    if other:
        where = [i for i, t in enumerate(types) if t in other]
        raise UnsupportedModel(
            f"layer type {', '.join(repr(t) for t in other)} (layers {where[:8]}{'...' if len(where) > 8 else ''}): "
            f"vrex's KV cache runs full and sliding-window attention layers only")
    window = getattr(cfg, "sliding_window", None)
    if SLIDING in types and not window:
        raise UnsupportedModel("sliding-attention layers without config.sliding_window: the window size is unknown")
    ropes = _rope_modules(lm)
    if len(ropes) not in (0, 1, len(types)):
        raise UnsupportedModel(f"{len(ropes)} rotary-embedding modules for {len(types)} layers: vrex cannot tell "
                               f"which RoPE each layer uses")
    specs = []
    for i, t in enumerate(types):
        rope = ropes[0] if len(ropes) == 1 else ropes[i] if ropes else None
        specs.append(LayerSpec(i, int(window) if t == SLIDING else None,
                               None if rope is None else _inv_freq(rope, t), _rope_type(cfg, t)))
    if ropes:
        specs = [replace(spec, rope_layout=layout) for spec, layout in zip(specs, rope_layouts(lm, specs))]
    return specs


#: rope_layouts' answers per model object: one probe (two short forwards) per model, not per session
_LAYOUTS: WeakKeyDictionary = WeakKeyDictionary()
#: the probe: a few tokens, moved by a shift that turns even the slowest-rotating pair measurably
_PROBE_TOKENS, _PROBE_SHIFT = 4, 37


def rope_layouts(lm, specs: list[LayerSpec]) -> tuple[str | None, ...]:
    """Each layer's RoPE layout (``HALF``/``PAIRS``), measured on ``lm``: its post-RoPE keys of a short
    input at positions ``0..n-1`` and at ``s..s+n-1``; a layout counts when moving the first keys by
    ``s`` with it reproduces the second within the dtype's rounding (None when neither does)."""
    if lm not in _LAYOUTS:
        first, moved = _probe_keys(lm, 0), _probe_keys(lm, _PROBE_SHIFT)
        tol = 1e-3 if next(lm.parameters()).dtype == torch.float32 else 5e-2
        layouts = []
        for spec, k0, k1 in zip(specs, first, moved):
            delta = torch.full((k0.shape[-2],), _PROBE_SHIFT)
            err = {layout: float((rerotate(k0.float(), delta, spec.inv_freq, layout) - k1.float()).norm()
                                 / k1.float().norm().clamp_min(1e-12)) for layout in ROPE_LAYOUTS}
            best = min(err, key=err.get)
            layouts.append(best if err[best] < tol else None)
        _LAYOUTS[lm] = tuple(layouts)
    return _LAYOUTS[lm]


def _probe_keys(lm, start: int) -> list[torch.Tensor]:
    """Every layer's post-RoPE keys [H, n, D] of ``_PROBE_TOKENS`` fixed tokens at positions from ``start``
    (transformers' own cache collects them; the ``"vrex"`` attention falls back to SDPA without a VrexCache)."""
    from transformers import DynamicCache

    device = next(lm.parameters()).device
    ids = (torch.arange(_PROBE_TOKENS) * 7 + 3) % text_config(lm.config).vocab_size
    cache = DynamicCache(config=lm.config)
    with torch.no_grad():
        lm(input_ids=ids[None].to(device), position_ids=torch.arange(start, start + _PROBE_TOKENS, device=device)[None],
           past_key_values=cache, use_cache=True)
    return [layer.keys[0].cpu() for layer in cache.layers]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """``rotate_half`` for interleaved RoPE: each pair ``(x[2i], x[2i+1])`` becomes ``(-x[2i+1], x[2i])``."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def rotation(delta: torch.Tensor, inv_freq: torch.Tensor, layout: str = HALF) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``[N, R]`` (float32, on ``inv_freq``'s device) of the rotation by ``delta`` [N]
    positions: what :func:`rerotate` applies. Layers with the same ``inv_freq`` and layout share it."""
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"RoPE layout '{layout}' is not one of: {', '.join(ROPE_LAYOUTS)}")
    freqs = delta.to(device=inv_freq.device, dtype=inv_freq.dtype)[:, None] * inv_freq[None, :]  # [N, R/2]
    emb = torch.cat((freqs, freqs), dim=-1) if layout == HALF else freqs.repeat_interleave(2, dim=-1)
    return emb.cos(), emb.sin()


def rerotate(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, layout: str = HALF, *,
             trig: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Move post-RoPE ``keys`` [..., N, D] by ``delta`` [N] positions. ``layout``: which dimensions rotate
    together, ``HALF`` (``i`` with ``i + R/2``: Llama, Qwen2, Mistral, Gemma, Phi, GPT-NeoX) or
    ``PAIRS`` (``2i`` with ``2i + 1``: Cohere, GLM; see ``rope_layouts``).

    ``inv_freq`` [R/2] is the layer's own: its length gives the rotary width R, and only the first R
    dimensions rotate (partial rotary: GPT-NeoX ``rotary_pct``, Phi ``partial_rotary_factor``); the
    rest pass through. The rotation is unscaled: a RoPE ``attention_scaling`` (YaRN) was applied once,
    when the key was first rotated, and R(delta) R(p) s k = R(p + delta) s k. ``trig``: the
    :func:`rotation` of the same ``delta``, ``inv_freq`` and layout, when the caller moves many layers.
    """
    rot = 2 * inv_freq.shape[-1]
    if rot > keys.shape[-1]:
        raise ValueError(f"RoPE width {rot} exceeds the key width {keys.shape[-1]}")
    cos, sin = rotation(delta, inv_freq, layout) if trig is None else trig
    dtype = keys.dtype
    if keys.dtype in (torch.bfloat16, torch.float16):
        keys = keys.float()  # rotated in float32 and rounded once (bf16 arithmetic lost ~3 digits per re-index)
    cos, sin = cos.to(keys.device, keys.dtype), sin.to(keys.device, keys.dtype)
    turn = rotate_half if layout == HALF else rotate_pairs
    head = keys if rot == keys.shape[-1] else keys[..., :rot]
    moved = turn(head).mul_(sin).addcmul_(head, cos)  # turn() returns a new tensor: one temporary, not three
    moved = moved if rot == keys.shape[-1] else torch.cat((moved, keys[..., rot:]), dim=-1)
    return moved.to(dtype)


def check_supported(lm) -> list[LayerSpec]:
    """Everything the engine needs from ``lm``, or :class:`UnsupportedModel` naming what is missing."""
    if not getattr(lm, "_supports_attention_backend", False):
        raise UnsupportedModel(
            "its attention does not go through transformers' AttentionInterface (_supports_attention_backend is "
            "False), which is how vrex's KV cache attends")
    model_geometry(lm)
    specs = layer_specs(lm)
    if any(s.inv_freq is None for s in specs):
        raise UnsupportedModel(
            "no rotary position embedding (RoPE) found: vrex stores keys after RoPE (what ReSV hashes and position "
            "re-indexing rotates); learned or ALiBi positions are not supported")
    return specs
