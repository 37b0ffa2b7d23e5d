"""Needle training at minutes of context on a CPU: a detached haystack memory, as in Transformer-XL.

A 5-minute stream is ~6.6K tokens; one forward+backward through SmolLM2-135M over it takes ~150 s
on one core, so the plain LIVE loss cannot be trained at that length here. But in a silent
haystack nothing is supervised: the loss sits on the needle (its gate and narration, when it is
narrated) and on the answer at the end. So:

1. **Memory**: a long silent haystack of one subject is prefilled once, without gradients, and its
   KV cache kept (``HaystackMemory``; rebuilt every ``refresh`` steps so it follows the connector).
2. **Step**: a needle replaces ``k`` haystack frames at frame ``a`` of a prefix of the memory
   (``n`` frames, drawn per step). Only the *span* (the needle frames, the frame after them and
   their text) and the *tail* (question and answer) are run, with gradients: the span attends to the
   memory's KV before it, the tail to [memory before | span (with grad) | memory after].

The KV after the span is stale: it was computed with haystack frames where the needle now is (a
stop-gradient memory, as Transformer-XL's; the staleness is the price of O(span + tail) cost per
step instead of O(n)). When the needle is narrated the span is longer than the haystack tokens it
replaces, so the stale keys after it are re-rotated by the difference (``rerotate``), which keeps
every token's RoPE position exact. With the haystack itself as the "needle" nothing is stale and
the loss equals the full forward's (tests/train/test_long_context.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from vrex.engine.positions import rerotate
from vrex.train.data import FPS, FeatureCache
from vrex.train.layout import LM, STREAM, Layout, LayoutBuilder, Step, Turn, embed_layout
from vrex.train.streams import NEEDLE_QUESTION, StreamMaker, sentence


@dataclass
class HaystackMemory:
    """The detached KV of a silent haystack: ``keys[i]``/``values[i]`` are layer i's ``[1, H_kv, T, D]``."""

    steps: list[Step]
    layout: Layout
    features: torch.Tensor  # [n_frames, tokens, d_vis]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    block: int = -1  # which refresh block built it (the trainer rebuilds it once per block)

    @property
    def frames(self) -> int:
        return len(self.steps)


def frame_features(cache: FeatureCache, steps: list[Step]) -> torch.Tensor:
    return torch.stack([cache.features[s.media][s.frame] for s in steps]).float()


#: positions kept free after a haystack: the needle, the question and its answer
QUESTION_MARGIN = 64


def check_haystack_fits(model, builder: LayoutBuilder, n_frames: int, hint: str = "") -> None:
    """Refuse a silent ``n_frames`` haystack that, with ``QUESTION_MARGIN``, exceeds the LM's positions
    (past them RoPE angles were never trained). One rule for the trainer's check before training
    and ``build_memory``'s at each long step."""
    limit = model.lm.config.max_position_embeddings
    need = builder.silent_length(n_frames) + QUESTION_MARGIN
    if need > limit:
        raise ValueError(f"a {n_frames}-frame haystack at {builder.tpf} + 1 tokens per frame needs {need} positions "
                         f"({QUESTION_MARGIN} of them for the question), the LM has {limit}{hint}")


@torch.no_grad()
def build_memory(model, builder: LayoutBuilder, cache: FeatureCache, maker: StreamMaker, rng: random.Random,
                 n_frames: int, haystack: str | None = None) -> HaystackMemory:
    """Prefill a silent ``n_frames`` haystack of one subject (drawn from ``maker``) and keep its KV."""
    haystack = haystack or rng.choice(maker.names)
    steps = [Step(haystack, f, i / FPS, gate=False) for i, f in enumerate(maker.segment_frames(rng, haystack, n_frames))]
    check_haystack_fits(model, builder, n_frames)
    layout = builder.build(steps)
    feats = frame_features(cache, steps)
    embeds = embed_layout(model, layout, feats)
    out = model.lm.model(inputs_embeds=embeds[None], use_cache=True)
    kv = out.past_key_values
    return HaystackMemory(steps, layout, feats, [layer.keys.detach() for layer in kv.layers],
                          [layer.values.detach() for layer in kv.layers])


def needle_steps(memory: HaystackMemory, maker: StreamMaker, rng: random.Random, n: int, a: int,
                 needle: str, k: int, narrate: bool) -> list[Step]:
    """The memory's first ``n`` steps with ``k`` needle frames at ``a`` and the needle question at the end.
    ``narrate``: the needle and the return to the haystack are narrated (gate labels on the span)."""
    steps = [Step(s.media, s.frame, s.t, gate=False) for s in memory.steps[:n]]
    for i, f in enumerate(maker.segment_frames(rng, needle, k)):
        steps[a + i] = Step(needle, f, steps[a + i].t, gate=narrate)
    steps[a + k] = Step(steps[a + k].media, steps[a + k].frame, steps[a + k].t, gate=narrate)
    if narrate:
        steps[a].turns.append(Turn(sentence(maker.label(needle))))
        steps[a + k].turns.append(Turn(sentence(maker.label(steps[a + k].media))))
    steps[-1].turns = [Turn(sentence(maker.label(needle)), NEEDLE_QUESTION)]
    return steps


def spliced_loss(model, builder: LayoutBuilder, memory: HaystackMemory, steps: list[Step], features: torch.Tensor,
                 a: int, k: int, stream_loss_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """LIVE loss of ``steps`` (the memory's haystack with frames ``a .. a+k-1`` replaced) computed on
    the span ``[frame a, frame a+k+1)`` and the tail after the last frame, over the memory's KV.

    ``features`` [len(steps), tokens, d_vis]. Frames outside the span must equal the memory's."""
    n = len(steps)
    if not (1 <= a and a + k + 1 < n <= memory.frames):
        raise ValueError(f"needle at frames {a}..{a + k - 1} does not fit a {n}-frame stream of a {memory.frames}-frame memory")
    layout = builder.build(steps)
    fs, hfs, tpf = layout.frame_starts, memory.layout.frame_starts, layout.tokens_per_frame
    s, e, he = fs[a], fs[a + k + 1], hfs[a + k + 1]
    last_end, h_last_end = fs[n - 1] + tpf, hfs[n - 1] + tpf
    hids = memory.layout.ids
    if s != hfs[a] or not torch.equal(layout.ids[:s], hids[:s]) or not torch.equal(layout.ids[e:last_end], hids[he:h_last_end]):
        raise ValueError("the stream's tokens outside the span differ from the memory's (a turn outside the span?)")
    lm = model.lm.model
    span_layout = Layout(layout.ids[s:e], layout.targets[s:e], layout.kinds[s:e],
                         [f - s for f in fs[a:a + k + 1]], tpf)
    # the temporal connector reads frame a-1 as the span's "previous" frame
    span_vis = model.connector(features[a:a + k + 1].to(model.device), previous=features[a - 1].to(model.device))
    text = model.embed_text(span_layout.ids.clamp(min=0).to(model.device))
    span_embeds = text.clone()
    span_embeds[span_layout.frame_mask.to(model.device)] = span_vis.reshape(-1, text.shape[-1]).to(text.dtype)
    past = DynamicCache(ddp_cache_data=[(kk[:, :, :s], vv[:, :, :s]) for kk, vv in zip(memory.keys, memory.values)])
    dev = model.device
    h_span = lm(inputs_embeds=span_embeds[None], position_ids=torch.arange(s, e, device=dev)[None],
                past_key_values=past, use_cache=True).last_hidden_state[0]
    shift = e - he  # the span is longer than the haystack tokens it replaced (narration): move the stale keys
    inv_freq = lm.rotary_emb.inv_freq
    for layer, kk, vv in zip(past.layers, memory.keys, memory.values):
        keys = kk[:, :, he:h_last_end]
        if shift:
            keys = rerotate(keys, torch.full((keys.shape[-2],), shift, device=keys.device), inv_freq)
        layer.update(keys, vv[:, :, he:h_last_end])
    tail_ids = layout.ids[last_end:]
    h_tail = lm(inputs_embeds=model.embed_text(tail_ids.to(dev))[None], position_ids=torch.arange(last_end, len(layout), device=dev)[None],
                past_key_values=past, use_cache=True).last_hidden_state[0]
    hidden = torch.cat([h_span, h_tail])
    targets = torch.cat([layout.targets[s:e], layout.targets[last_end:]]).to(dev)
    kinds = torch.cat([layout.kinds[s:e], layout.kinds[last_end:]]).to(dev)
    sup = kinds != 0
    logits = model.lm.lm_head(hidden[sup]).float()
    targets, kinds = targets[sup], kinds[sup]
    ce = F.cross_entropy(logits, targets, reduction="none")
    w = torch.where(kinds == STREAM, torch.tensor(stream_loss_weight, device=dev), torch.tensor(1.0, device=dev))
    loss = (w * ce).sum() / ce.numel()
    lm_mask, st = kinds == LM, kinds == STREAM
    ce, logits = ce.detach(), logits.detach()
    stats = {"loss": loss.item(),
             "lm_ce": float(ce[lm_mask].mean()) if lm_mask.any() else float("nan"),
             "stream_ce": float(ce[st].mean()) if st.any() else float("nan"),
             "stream_acc": float((logits[st].argmax(-1) == targets[st]).float().mean()) if st.any() else float("nan"),
             "tokens": len(layout)}
    return loss, stats


def long_needle_loss(model, builder: LayoutBuilder, cache: FeatureCache, maker: StreamMaker, memory: HaystackMemory,
                     rng: random.Random, frames: tuple[int, int], narrate_fraction: float,
                     stream_loss_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """One long-needle training sample over ``memory``: length in ``frames`` (capped by the memory),
    a 2-4 frame needle of another subject at a random place, narrated with ``narrate_fraction``."""
    n = rng.randint(min(frames[0], memory.frames), min(frames[1], memory.frames))
    hay = memory.steps[0].media
    needle = rng.choice([m for m in maker.names if maker.label(m) != maker.label(hay)])
    k = rng.randint(2, 4)
    a = max(1, min(n - k - 2, int(round(rng.uniform(0.1, 0.8) * (n - k)))))
    narrate = rng.random() < narrate_fraction
    steps = needle_steps(memory, maker, rng, n, a, needle, k, narrate)
    loss, stats = spliced_loss(model, builder, memory, steps, frame_features(cache, steps), a, k, stream_loss_weight)
    return loss, {**stats, "kind": "long-needle" + ("" if narrate else "-silent")}
