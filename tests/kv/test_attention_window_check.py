"""The "vrex" attention function refuses a model whose sliding window disagrees with the cache's layer
spec (a cache built without ``layer_specs(model)`` would attend over the wrong tokens), and attends
when they agree."""

from __future__ import annotations

import pytest
import torch

from vrex.kv.attention import vrex_attention_forward
from vrex.kv.cache import VrexCache
from vrex.kv.layers import LayerSpec
from vrex.kv.policies import make_policy
from vrex.kv.store import KVStore


class _Module(torch.nn.Module):
    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx


def test_a_window_the_cache_does_not_know_is_refused_naming_the_layer():
    cache = VrexCache(KVStore(2, 1, 8), make_policy("full"), num_q_heads=2, kernels="reference",
                      layers=[LayerSpec(0), LayerSpec(1, window=4)])
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    with pytest.raises(RuntimeError, match="layer 0: the model attends with sliding_window=4 but the cache's layer spec says None"):
        vrex_attention_forward(_Module(0), q, k, k, None, vrex_cache=cache, sliding_window=4)
    out, _ = vrex_attention_forward(_Module(1), q, k, k, None, vrex_cache=cache, sliding_window=4)
    assert out.shape == (1, 3, 2, 8) and cache.layers[1].kv.length == 3
