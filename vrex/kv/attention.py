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
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if vrex_cache is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return vrex_cache.attend(module.layer_idx, query, key, value, scaling), None


def register() -> None:
    """Idempotent: make ``"vrex"`` a valid ``attn_implementation`` (attention and mask)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, vrex_attention_forward)
    # The SDPA mask serves the fallback path; on the cache path ``attend`` builds its own mask.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    assert ATTN_IMPLEMENTATION in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


register()
