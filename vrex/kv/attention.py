"""The ``"vrex"`` attention implementation, registered in transformers' ``AttentionInterface``.

A model switched to it (``model.set_attn_implementation("vrex")``) runs its attention through
``VrexCache.attend`` whenever the forward is given ``vrex_cache=<VrexCache>`` (transformers passes
extra forward kwargs down to the attention function). Without that kwarg, e.g. in training, it
falls back to transformers' own SDPA attention with the usual mask, so one model object serves both.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "vrex"


def vrex_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    vrex_cache=None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature. ``sliding_window`` and ``softcap`` are what the
    model's attention module passes (Mistral, Qwen2, Gemma); on the cache path the window comes from
    the cache's layer specs (the model's config) and must agree with it, the cap is applied as
    transformers' eager attention applies it (scale, ``tanh(s / cap) * cap``, mask)."""
    if vrex_cache is None:
        if softcap is not None:  # SDPA has no soft-capping: transformers' eager attention does it
            from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

            return eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                           dropout=dropout, softcap=softcap)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    # the layer's own spec, looked up only when the model passes a window (a batched cache's layers have none)
    spec = None if sliding_window is None else getattr(vrex_cache.layers[module.layer_idx], "spec", None)
    if spec is not None and spec.window != sliding_window:
        raise RuntimeError(
            f"layer {module.layer_idx}: the model attends with sliding_window={sliding_window} but the cache's layer "
            f"spec says {spec.window}; build the cache with vrex.kv.layers.layer_specs(model)")
    extra = {} if softcap is None else {"softcap": softcap}
    return vrex_cache.attend(module.layer_idx, query, key, value, scaling, **extra), None


def register() -> None:
    """Idempotent: make ``"vrex"`` a valid ``attn_implementation`` (attention and mask)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, vrex_attention_forward)
    # The SDPA mask serves the fallback path; on the cache path ``attend`` builds its own mask.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    assert ATTN_IMPLEMENTATION in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


register()
