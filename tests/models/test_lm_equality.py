"""Every LM family computes in vrex's engine what transformers computes, past the sliding window.

Tiny random-weight models of each family (``tiny_models.FAMILIES``: Gemma 3 with local and global
layers, Gemma 2 with soft-capping, Mistral and Qwen2 with a 16-token window, Phi-3 and GPT-NeoX with
partial rotary, Llama, Qwen2) stream real frames through a ``StreamingSession``; the reference is one
forward over the same embeddings with transformers' own masks (sliding windows included):

* ``full``: the session's step logits equal transformers' eager forward (max |diff| < 1e-3);
* every policy: what each step of each layer read (recorded at the store) is applied to the same
  tokens in the one-shot forward (transformers' mask AND the recorded reads), and the logits agree;
* re-indexing: keys moved by ``VrexCache.reindex`` equal the keys of a forward at the new positions,
  layer by layer (local and global RoPE bases, partial rotary), and a stream past its position limit
  equals transformers' forward over the re-indexed cache.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny_models import FAMILIES, WINDOW
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from vrex.engine.positions import PositionConfig
from vrex.engine.session import SessionConfig, StreamingSession
from vrex.kv.layers import HALF, PAIRS, UnsupportedModel, layer_specs, rerotate
from vrex.kv.policies import POLICIES, make_policy

SLIDING = ["gemma3_text", "gemma2", "mistral", "qwen2_sliding"]
#: a short stream (about 110 tokens) needs StreamingLLM's window short enough to evict
SHORT_STREAM_SPECS = {"streamingllm": "streamingllm[sink=4,window=40]"}
N_FRAMES = 6  # prefix + 6 frames of 10 tokens: every sliding layer is far past its 16-token window


@pytest.fixture
def models(family_model):
    return family_model


class StepLog:
    """The embeddings of every forward step of a session (the prefix included) and, per step and
    layer, the past tokens each KV head read (recorded where the store hands them out)."""

    def __init__(self, session: StreamingSession):
        model = session.model
        self.steps = [(0, session.cached_tokens, model.embed_text(model.tokenize(model.fmt.prefix)))]
        self.reads: dict[tuple[int, int], list[torch.Tensor]] = {}
        store, forward = session.store, session._forward

        def logged_gather(kv):
            def gather(indices):
                evicted = kv.is_evicted()
                live = (~evicted).nonzero().flatten()
                heads = [live] * store.num_kv_heads if indices is None else [i[~evicted[i]] for i in indices]
                self.reads[(len(self.steps), kv.index)] = heads
                return type(kv).gather(kv, indices)
            return gather

        def logged_forward(embeds, *args, **kwargs):
            start = session.cached_tokens
            out = forward(embeds, *args, **kwargs)
            self.steps.append((start, session.cached_tokens, embeds))
            return out

        for kv in store.layers:
            kv.gather = logged_gather(kv)
        session._forward = logged_forward

    def embeds(self) -> torch.Tensor:
        return torch.cat([e for _, _, e in self.steps])

    def read_mask(self, layer: int, heads: int, n: int) -> torch.Tensor:
        """bool [H_kv, N, N]: what the rows of each step may read in ``layer`` (its own step: all, causality
        comes from transformers' mask)."""
        mask = torch.ones(heads, n, n, dtype=torch.bool)
        for s, (start, end, _) in enumerate(self.steps):
            reads = self.reads.get((s, layer))
            if reads is None:
                continue
            mask[:, start:end, :start] = False
            for h, ids in enumerate(reads):
                ids = ids[ids < start]
                mask[h, start:end, ids] = True
        return mask


def _read_log_attention(log: StepLog):
    """An attention function: transformers' mask (causal, sliding) AND the session's recorded reads."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
        h_q, h_kv, n = query.shape[1], key.shape[1], key.shape[2]
        allowed = attention_mask[0, 0] == 0  # eager mask: 0 where transformers lets a row attend
        allowed = allowed[None] & log.read_mask(module.layer_idx, h_kv, n)
        allowed = allowed.repeat_interleave(h_q // h_kv, dim=0)  # query head i reads KV head i // groups
        groups = h_q // h_kv
        k, v = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        scores = torch.matmul(query, k.transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        out = torch.matmul(scores.float().softmax(-1).to(v.dtype), v)
        return out.transpose(1, 2).contiguous(), None

    return attention


def _capture_logits(lm):
    captured: list[torch.Tensor] = []
    handle = lm.register_forward_hook(lambda module, args, out: captured.append(out.logits[0].detach().clone()))
    return captured, handle


def _stream(model, frames, policy="full", **config) -> tuple[StreamingSession, StepLog, list[torch.Tensor]]:
    config = {"theta": 0.0, "positions": PositionConfig(mode="absolute"), **config}
    session = StreamingSession(model, make_policy(SHORT_STREAM_SPECS.get(policy, policy)), SessionConfig(**config))
    log = StepLog(session)
    captured, handle = _capture_logits(model.lm)
    try:
        for i in range(N_FRAMES):
            events = session.push_frame(0.5 * i, frames[i % len(frames)])
            assert [e.kind for e in events] == ["frame"]  # theta 0: silent
    finally:
        handle.remove()
    return session, log, captured


def _compare(log: StepLog, captured: list[torch.Tensor], reference: torch.Tensor) -> float:
    """Largest difference of the logits each step computed (a frame step: its last token's, the only row
    the LIVE loop reads; every other row's keys and values feed the later steps) from the one-shot ones."""
    diffs = []
    for (start, end, _), step in zip(log.steps[1:], captured):
        assert 1 <= step.shape[0] <= end - start
        diffs.append(float((step - reference[end - step.shape[0]:end]).abs().max()))
    return max(diffs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_iterative_prefill_equals_one_shot_past_the_window(family, models, frames):
    model = models(family)
    session, log, captured = _stream(model, frames)
    specs = session.cache.specs
    assert session.cached_tokens > 4 * WINDOW
    model.lm.set_attn_implementation("eager")  # transformers' own attention and masks, no cache
    with torch.no_grad():
        reference = model.lm(inputs_embeds=log.embeds()[None]).logits[0]
    assert _compare(log, captured, reference) < 1e-3
    # sliding layers keep only what a later query can still see; full layers keep everything
    for spec in specs:
        live = int((~session.store.layers[spec.index].is_evicted()).sum())
        assert live == (WINDOW - 1 if spec.sliding else session.cached_tokens)
    assert any(s.sliding for s in specs) == (family in SLIDING)


@pytest.mark.parametrize("family", SLIDING + ["phi3", "gpt_neox"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_each_policy_equals_one_shot_with_its_reads(family, policy, models, frames):
    """The session's reads per step, layer and KV head, applied to one transformers forward, give the
    session's logits: selection, always-kept tokens, eviction and windows are what attention used."""
    model = models(family)
    session, log, captured = _stream(model, frames, policy, recent_tokens=0, kernels="reference", device_tokens=24)
    AttentionInterface.register("vrex_readlog", _read_log_attention(log))
    AttentionMaskInterface.register("vrex_readlog", eager_mask)
    model.lm.set_attn_implementation("vrex_readlog")
    with torch.no_grad():
        reference = model.lm(inputs_embeds=log.embeds()[None]).logits[0]
    assert _compare(log, captured, reference) < 1e-3
    full_layers = [s.index for s in session.cache.specs if not s.sliding]
    # sliding layers never reach the policy: they read their window, nothing older
    for (step, layer), heads in log.reads.items():
        if session.cache.specs[layer].sliding:
            start = log.steps[step][0]
            assert all(int(ids.min()) >= start + 1 - WINDOW for ids in heads if ids.numel())
    if policy not in ("full", "flexgen") and full_layers:  # (flexgen offloads but reads everything)
        # the policy really chose: some full-layer step read less than its whole past
        assert any(sum(i.numel() for i in heads) < len(heads) * log.steps[step][0]
                   for (step, layer), heads in log.reads.items() if layer in full_layers and step > 1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reindex_equals_forward_at_new_positions(family, models):
    """RoPE attention sees only relative positions, so shifting every position by 37 leaves the hidden
    states alone and rotates each layer's keys by 37 with that layer's RoPE: what ``rerotate`` must do."""
    model = models(family)
    keys: list[torch.Tensor] = []

    def record(module, query, key, value, attention_mask, **kwargs):
        keys.append(key[0].detach().clone())
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        kwargs.pop("sliding_window", None)
        kwargs.pop("softcap", None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("vrex_keylog", record)
    AttentionMaskInterface.register("vrex_keylog", eager_mask)
    model.lm.set_attn_implementation("vrex_keylog")
    embeds = model.embed_text(model.tokenize(model.fmt.prefix))[None]
    n = embeds.shape[1]
    with torch.no_grad():
        model.lm(inputs_embeds=embeds, position_ids=torch.arange(n)[None])
        model.lm(inputs_embeds=embeds, position_ids=torch.arange(37, 37 + n)[None])
    specs = layer_specs(model.lm)
    before, after = keys[:len(specs)], keys[len(specs):]
    # which dimensions rotate together, as each family's modeling code does it (measured by layer_specs)
    layout = PAIRS if family in ("cohere", "glm") else HALF
    assert [spec.rope_layout for spec in specs] == [layout] * len(specs)
    for spec, k0, k1 in zip(specs, before, after):
        moved = rerotate(k0, torch.full((n,), 37), spec.inv_freq, spec.rope_layout)
        torch.testing.assert_close(moved, k1, atol=1e-4, rtol=1e-4)
        other = rerotate(k0, torch.full((n,), 37), spec.inv_freq, HALF if layout == PAIRS else PAIRS)
        assert not torch.allclose(other, k1, atol=1e-2)  # the other layout would move the keys wrongly
        if 2 * spec.inv_freq.numel() < k0.shape[-1]:  # partial rotary: the tail passes through unrotated
            torch.testing.assert_close(k0[..., 2 * spec.inv_freq.numel():], k1[..., 2 * spec.inv_freq.numel():])
    assert not torch.allclose(before[0], after[0], atol=1e-3)
    if family == "gemma3_text":  # local and global layers rotate with different bases
        assert not torch.equal(specs[0].inv_freq, specs[1].inv_freq)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3", "cohere", "glm"])
def test_cache_reindex_moves_stored_keys_to_a_forward_at_the_new_positions(family, models):
    """``VrexCache.reindex`` rotates each layer with the layer's own RoPE (frequencies, rotary width and
    dimension layout: interleaved pairs on Cohere and GLM): a session's stored keys moved by 37 equal the
    keys transformers computes for the same tokens at positions 37 later."""
    model = models(family)
    session = StreamingSession(model, make_policy("full"), SessionConfig(positions=PositionConfig(mode="absolute")))
    n = session.cached_tokens
    embeds = model.embed_text(model.tokenize(model.fmt.prefix))[None]
    assert embeds.shape[1] == n
    reference = DynamicCache(config=model.lm.config)
    with torch.no_grad():
        model.lm(inputs_embeds=embeds, position_ids=torch.arange(37, 37 + n)[None], past_key_values=reference)
    session.cache.reindex(torch.full((n,), 37))
    for layer in range(session.store.num_layers):
        want = reference.layers[layer].keys[0]  # a sliding layer keeps its last tokens only: compare those
        torch.testing.assert_close(session.store.layers[layer].keys()[:, -want.shape[1]:], want, atol=1e-4, rtol=1e-4)


def test_reindex_refuses_a_layer_whose_rope_layout_was_not_found(models):
    session = StreamingSession(models("llama"), make_policy("full"), SessionConfig(positions=PositionConfig(mode="absolute")))
    keys = session.store.layers[1].keys().clone()
    session.cache.layers[1].spec = replace(session.cache.layers[1].spec, rope_layout=None)
    with pytest.raises(UnsupportedModel, match="layer 1: its RoPE moves keys neither as half-split nor as interleaved"):
        session.cache.reindex(torch.full((session.cached_tokens,), 5))
    assert torch.equal(session.store.layers[1].keys(), keys)  # checked before any layer moved


@pytest.mark.parametrize("family", ["gemma3_text", "gpt_neox", "mistral", "glm"])
def test_stream_past_position_limit_equals_forward_over_reindexed_cache(family, models, frames):
    model = models(family)
    limit = len(model.tokenize(model.fmt.prefix)) + 40  # the prefix is the sink; frames pass the limit twice
    session = StreamingSession(model, make_policy("full"),
                               SessionConfig(theta=0.0, positions=PositionConfig(mode="compress", max_position=limit)))
    captured, handle = _capture_logits(model.lm)
    try:
        for i in range(5):
            session.push_frame(0.5 * i, frames[i % len(frames)])
        assert session.cached_tokens > limit
        n_before = session.cached_tokens
        pending = model.embed_text(session._pending)
        previous = model.encode_frames([frames[4 % len(frames)]])[0]
        # the past as the last step attends to it (re-indexed first if the step re-indexes; sliding layers drop
        # part of it after the step): snapshot it when the LM is called
        past: list[tuple[torch.Tensor, torch.Tensor]] = []
        snap = model.lm.register_forward_pre_hook(lambda module, args: past.extend(
            (session.store.layers[i].keys(), session.store.layers[i].values()) for i in range(session.store.num_layers)))
        try:
            session.push_frame(2.5, frames[5 % len(frames)])
        finally:
            snap.remove()
    finally:
        handle.remove()
    new_positions = session.positions[n_before:]
    reference = DynamicCache()
    for layer, (keys, values) in enumerate(past):  # tokens out of a sliding window are zeros, masked by transformers
        reference.update(keys[None], values[None], layer)
    embeds = torch.cat([pending, model.embed_frames([frames[5 % len(frames)]], previous=previous)[0]])[None]
    model.lm.set_attn_implementation("eager")
    with torch.no_grad():
        logits = model.lm(inputs_embeds=embeds, position_ids=new_positions[None], past_key_values=reference).logits[0]
    assert float((captured[-1] - logits[-captured[-1].shape[0]:]).abs().max()) < 1e-3  # the rows the step computed
    assert int(session.positions.max()) < limit
