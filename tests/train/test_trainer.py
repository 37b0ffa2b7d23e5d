"""Trainer: real features lower the LIVE loss; interrupted+resumed training equals uninterrupted;
held-out media never reach training."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from vrex.train.data import split_names
from vrex.train.layout import LayoutBuilder
from vrex.train.features import stream_features
from vrex.train.trainer import Recipe, draw_stream, live_loss, train


def test_few_steps_reduce_loss(videollm, maker, cache):
    model = copy.copy(videollm)
    model.connector = copy.deepcopy(videollm.connector).requires_grad_(True)
    videollm.lm.requires_grad_(False)
    builder = LayoutBuilder.for_model(model)
    stream = maker.narration_stream(random.Random(3), n_segments=(2, 2), seg_len=(3, 3), max_questions=1, question_prob=1.0)
    layout, feats = builder.build(stream.steps), stream_features(cache, stream)
    opt = torch.optim.AdamW(model.connector.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss, _ = live_loss(model, layout, feats)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    final, stats = live_loss(model, layout, feats)
    assert final.item() < 0.8 * losses[0], losses + [final.item()]
    assert stats["tokens"] == len(layout)


def _fresh(model):
    m = copy.copy(model)
    m.lm = copy.deepcopy(model.lm)
    m.connector = copy.deepcopy(model.connector)
    return m


def test_resume_equals_uninterrupted(tiny_videollm, cache, tmp_path):
    recipe = Recipe(steps=6, checkpoint_every=100, lr=3e-3, warmup=2, seed=1)
    full = train(recipe, tmp_path / "a", out=tmp_path / "a.safetensors", resume=False, model=_fresh(tiny_videollm), cache=cache, progress=False)
    part = train(recipe, tmp_path / "b", out=tmp_path / "b.safetensors", resume=False, model=_fresh(tiny_videollm), cache=cache,
                 progress=False, stop_after=3)
    assert part.step == 3 and not (tmp_path / "b.safetensors").exists()
    rest = train(recipe, tmp_path / "b", out=tmp_path / "b.safetensors", resume=True, model=_fresh(tiny_videollm), cache=cache, progress=False)
    assert rest.step == 6
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["loss"] for h in full.history] == [h["loss"] for h in rest.history]
    with pytest.raises(ValueError, match="seed"):
        train(Recipe(steps=6, seed=2), tmp_path / "b", out=None, model=_fresh(tiny_videollm), cache=cache, progress=False)


def test_lora_flag_trains_adapters(tiny_videollm, cache, tmp_path):
    from vrex.models.lora import load_lora

    recipe = Recipe(steps=2, lora=True, lora_rank=2, checkpoint_every=100, lr=3e-2, warmup=1)
    model = _fresh(tiny_videollm)
    train(recipe, tmp_path / "r", out=tmp_path / "w.safetensors", resume=False, model=model, cache=cache, progress=False)
    ckpt = load_file(str(tmp_path / "r" / "checkpoint.safetensors"))
    assert any("lora_A" in k for k in ckpt) and any(k.startswith("connector.") for k in ckpt)
    # the exported file carries the adapters too, and they load into a fresh LM (what load_videollm does)
    fresh = _fresh(tiny_videollm)
    assert load_lora(fresh.lm, tmp_path / "w.safetensors")
    trained = dict(model.lm.named_parameters())
    for name, p in fresh.lm.named_parameters():
        if "lora_B" in name:
            assert torch.equal(p, trained[name]) and p.abs().sum() > 0, name


def test_heldout_media_never_trained_on(catalog, maker):
    held = set(split_names(catalog, "heldout"))
    train_names = set(split_names(catalog, "train"))
    assert held and not (held & train_names)
    assert {catalog[n].file for n in held}.isdisjoint({catalog[n].file for n in train_names})
    assert set(maker.names) == train_names
    recipe = Recipe()
    seen = set()
    for step in range(400):
        stream = draw_stream(maker, recipe, step)
        seen |= {s.media for s in stream.steps}
    assert not (seen & held), seen & held
    # held-out labels may appear as *words* ("Did you see a cat?" negatives) but never as frames
    assert len(seen) >= len(train_names) - 2


def test_narration_streams_follow_the_recipes_ranges(maker):
    """--narration-segments / --narration-frames shape the narration streams; the defaults draw exactly the
    streams every shipped model trained on (StreamMaker.narration_stream's own defaults)."""
    long = Recipe(needle_fraction=0.0, narration_segments=(6, 9), narration_frames=(12, 20))
    short = Recipe(needle_fraction=0.0)
    for step in range(20):
        stream = draw_stream(maker, long, step)
        assert 6 <= len(stream.segments) <= 9
        assert all(12 <= seg.end - seg.start <= 20 for seg in stream.segments)
        assert all(a.label != b.label for a, b in zip(stream.segments, stream.segments[1:]))
        default = draw_stream(maker, short, step)
        rng = random.Random(f"{short.seed}-{step}")
        rng.random()  # draw_stream's needle-or-narration draw
        reference = maker.narration_stream(rng)
        assert [(s.media, s.start, s.end) for s in default.segments] == [(s.media, s.start, s.end) for s in reference.segments]


def test_long_narration_fraction_mixes_long_and_short_streams(maker):
    """--long-narration-fraction draws that share of narration streams with the long shape and the rest
    exactly as a recipe without it (the long/short draw has its own RNG)."""
    mixed = Recipe(needle_fraction=0.0, long_narration_fraction=0.5, long_narration_segments=(7, 9), long_narration_frames=(14, 18))
    short = Recipe(needle_fraction=0.0)
    shapes = []
    for step in range(40):
        stream = draw_stream(maker, mixed, step)
        is_long = len(stream.segments) >= 7 and all(14 <= seg.end - seg.start <= 18 for seg in stream.segments)
        shapes.append(is_long)
        if not is_long:
            plain = draw_stream(maker, short, step)
            assert [(s.media, s.start, s.end) for s in stream.segments] == [(s.media, s.start, s.end) for s in plain.segments]
            assert 2 <= len(stream.segments) <= 4
    assert 10 <= sum(shapes) <= 30, shapes  # about half of 40 draws


def test_second_stage_starts_from_init_weights(tiny_videollm, cache, tmp_path):
    """--init: a second stage starts from the given connector (not the seeded init) and is itself resumable."""
    first = train(Recipe(steps=3, checkpoint_every=100, lr=3e-3, warmup=1, seed=1), tmp_path / "s1", out=tmp_path / "s1.safetensors",
                  resume=False, model=_fresh(tiny_videollm), cache=cache, progress=False)
    assert first.step == 3
    stage2 = Recipe(steps=1, lr=1e-12, warmup=1, seed=5, init=str(tmp_path / "s1.safetensors"), needle_frames=(20, 30))
    train(stage2, tmp_path / "s2", out=tmp_path / "s2.safetensors", resume=False, model=_fresh(tiny_videollm), cache=cache, progress=False)
    s1, s2 = load_file(str(tmp_path / "s1.safetensors")), load_file(str(tmp_path / "s2.safetensors"))
    fresh = _fresh(tiny_videollm).connector.state_dict()
    for k in s1:  # a learning rate of 1e-12 barely moves it: it started from stage 1, not from the seeded init
        torch.testing.assert_close(s2[k], s1[k], atol=1e-6, rtol=0)
        assert not torch.allclose(s1[k], fresh[k]) or "bias" in k
    record = json.loads((tmp_path / "s2.json").read_text())
    assert record["recipe"]["init"] == str(tmp_path / "s1.safetensors")
    assert record["init_record"]["recipe"]["steps"] == 3  # the stage it started from is on record
    with pytest.raises(ValueError, match="init"):
        train(Recipe(steps=1, seed=5, lr=1e-12, needle_frames=(20, 30)), tmp_path / "s2", out=None, model=_fresh(tiny_videollm),
              cache=cache, progress=False)


def test_long_needles_resume_equals_uninterrupted(tiny_videollm, cache, tmp_path):
    """Long-needle steps (detached haystack memory, rebuilt per block of memory_refresh steps): a run
    interrupted at a block start and resumed equals the uninterrupted one."""
    recipe = Recipe(steps=8, checkpoint_every=2, memory_refresh=2, long_fraction=0.6, long_frames=(16, 30), lr=3e-3, warmup=2, seed=1)
    full = train(recipe, tmp_path / "a", out=tmp_path / "a.safetensors", resume=False, model=_fresh(tiny_videollm), cache=cache, progress=False)
    kinds = [h["kind"] for h in full.history]
    assert any(k.startswith("long-needle") for k in kinds[4:]) and any(not k.startswith("long") for k in kinds), kinds
    train(recipe, tmp_path / "b", out=tmp_path / "b.safetensors", resume=False, model=_fresh(tiny_videollm), cache=cache,
          progress=False, stop_after=4)
    rest = train(recipe, tmp_path / "b", out=tmp_path / "b.safetensors", resume=True, model=_fresh(tiny_videollm), cache=cache, progress=False)
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["loss"] for h in full.history] == [h["loss"] for h in rest.history]
    with pytest.raises(ValueError, match="multiple of memory_refresh"):
        train(Recipe(steps=2, long_fraction=0.5, memory_refresh=3, checkpoint_every=50), tmp_path / "c", out=None,
              model=_fresh(tiny_videollm), cache=cache, progress=False)
