"""Selections of different lengths per KV head, through VrexCache.attend with either kernel set,
against a dense masked softmax written out in full (issue 16: a mutant that dropped the per-head
padding mask survived every test; the shorter head then attended to padding rows)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from vrex.kv.cache import KeepConfig, VrexCache
from vrex.kv.policy import KVPolicy, Selection
from vrex.kv.store import KVStore

HKV, G, D, N_PAST = 2, 2, 32, 40
# head 0 reads 5 tokens, head 1 reads 23: head 0's gathered rows are padded up to 23
PICKS = [torch.tensor([0, 3, 9, 17, 30]), torch.cat([torch.tensor([0, 2, 4]), torch.arange(1, 40, 2)]).sort().values]


@dataclass
class FixedPicks(KVPolicy):
    """Reads the same fixed token ids every step, a different number per KV head."""

    name: ClassVar[str] = "fixed_picks"

    def select(self, layer, queries, n_past, stage) -> Selection:
        return Selection([p[p < n_past] for p in PICKS])


def dense_reference(q, k_all, v_all, n_past, scaling):
    """Per query row: softmax over the head's picked past tokens plus the step's own tokens up to it."""
    HQ, T, _ = q.shape
    out = torch.empty_like(q)
    for hq in range(HQ):
        h = hq // G
        allowed_past = torch.zeros(n_past, dtype=torch.bool)
        allowed_past[PICKS[h]] = True
        for i in range(T):
            allowed = torch.cat([allowed_past, torch.arange(T) <= i])
            s = (k_all[h] @ q[hq, i]) * scaling
            p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
            out[hq, i] = p @ v_all[h]
    return out


@pytest.mark.parametrize("kernels", ["reference", "fast"])
@pytest.mark.parametrize("T", [1, 6])  # 1: the fast path's in-place slot attention; 6: its gather + BLAS
def test_per_head_selection_lengths_mask_padding(kernels, T):
    assert PICKS[0].numel() != PICKS[1].numel()
    g = torch.Generator().manual_seed(3)
    store = KVStore(1, HKV, D)
    cache = VrexCache(store, FixedPicks(), KeepConfig(), num_q_heads=HKV * G, kernels=kernels)
    k0, v0 = torch.randn(1, HKV, N_PAST, D, generator=g), torch.randn(1, HKV, N_PAST, D, generator=g)
    # padding must matter: make the keys a padding row could copy (the first slots) score high
    k0[0, :, :2] *= 4.0
    cache.begin_step("frame", 0)
    cache.attend(0, torch.randn(1, HKV * G, N_PAST, D, generator=g), k0, v0, D ** -0.5)
    q = torch.randn(1, HKV * G, T, D, generator=g)
    k1, v1 = torch.randn(1, HKV, T, D, generator=g), torch.randn(1, HKV, T, D, generator=g)
    cache.begin_step("decode" if T == 1 else "text", None)
    got = cache.attend(0, q, k1, v1, D ** -0.5)[0].transpose(0, 1)  # [H_q, T, D]
    record = cache.end_step()
    assert record.layers[0]["selected"] == [int(p.numel()) for p in PICKS]
    want = dense_reference(q[0], torch.cat([k0[0], k1[0]], 1), torch.cat([v0[0], v1[0]], 1), N_PAST, D ** -0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
