"""Every policy + the tiered store through the real glue (VrexCache + the "vrex" attention) on a tiny Llama."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import vrex.kv.attention  # noqa: F401  (registers the "vrex" attention)
from vrex.kv.cache import KeepConfig, VrexCache
from vrex.kv.policies import POLICIES, make_policy
from vrex.kv.store import KVStore
from vrex.kv.telemetry import TelemetryWriter, read_jsonl

from _policy_cases import EVERYTHING

HID, NL, HQ, HKV, T, FRAMES = 32, 2, 4, 2, 5, 6


@pytest.fixture(scope="module")
def model():
    cfg = LlamaConfig(vocab_size=16, hidden_size=HID, intermediate_size=64, num_hidden_layers=NL,
                      num_attention_heads=HQ, num_key_value_heads=HKV, max_position_embeddings=256)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    m.set_attn_implementation("vrex")
    return m


def stream_inputs():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(T, HID, generator=g)
    out = []
    for _ in range(FRAMES):
        base = base + 0.1 * torch.randn(T, HID, generator=g)
        out.append(base.clone())
    return out


def run(model, policy, tmp_path, **store_kw):
    store = KVStore(NL, HKV, HID // HQ, **store_kw)
    cache = VrexCache(store, policy, KeepConfig(), num_q_heads=HQ)
    logits = []
    writer = TelemetryWriter(tmp_path / f"{policy.name}.jsonl")
    with torch.no_grad():
        for i, x in enumerate(stream_inputs()):
            cache.begin_step("frame", i)
            pos = torch.arange(i * T, (i + 1) * T)[None]
            out = model(inputs_embeds=x[None], position_ids=pos, past_key_values=cache, use_cache=True, vrex_cache=cache)
            writer(cache.end_step(), {"t": float(i), **store.counters()})
            logits.append(out.logits[0])
    writer.close()
    return torch.cat(logits), store, list(read_jsonl(tmp_path / f"{policy.name}.jsonl"))


def test_full_policy_equals_one_shot_forward(model, tmp_path):
    got, _, _ = run(model, make_policy("full"), tmp_path)
    x = torch.cat(stream_inputs())[None]
    with torch.no_grad():
        ref = model(inputs_embeds=x).logits[0]  # no vrex_cache: transformers' own SDPA path
    assert torch.allclose(got, ref, atol=1e-4)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_runs_through_cache_with_tiers(model, tmp_path, name):
    tb = 2 * (HID // HQ) * 4 * HKV * NL  # bytes of one token over all layers
    pol = make_policy(name)
    kw = {}
    if pol.offloads:
        kw = dict(device_budget_bytes=7 * tb, host_budget_bytes=12 * tb, disk_dir=tmp_path / "kv")
    logits, store, recs = run(model, pol, tmp_path, **kw)
    assert torch.isfinite(logits).all()
    assert len(recs) == FRAMES and all(r["stage"] == "frame" for r in recs)
    if pol.offloads:
        d_end, h_end, n = store.layers[0].tier_bounds()
        assert 0 < d_end < h_end < n == FRAMES * T
        assert recs[-1]["resident"]["device"] <= 7 * tb
    every = make_policy(name, **EVERYTHING[name])
    ref, _, _ = run(model, make_policy("full"), tmp_path)
    got, _, _ = run(model, every, tmp_path, **kw)
    assert torch.allclose(got, ref, atol=1e-4)  # selecting everything == full, through every tier
