"""Streams and training that teach ImageNet tag tokens (vrex.models.tags): ImageNet-named subjects,
random tags that can only be copied, and the trainer's --tag-tokens path end to end."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vrex.models.tags import imagenet_names, imagenet_phrase
from vrex.train.data import split_names
from vrex.train.streams import StreamMaker, sentence


@pytest.fixture(scope="module")
def imagenet_maker(cache, catalog):
    return StreamMaker(cache, catalog, split_names(catalog, "train"), labels="imagenet", tag_min_prob=0.5, random_tag_prob=0.5)


def test_imagenet_labels_follow_the_classifier_confidence(cache, catalog, imagenet_maker, maker):
    """Subjects whose smoothed top-1 reaches tag_min_prob are named by it, the others keep the hand label."""
    named = unsure = 0
    for name in imagenet_maker.names:
        top1, prob = cache.smoothed_top1(name)
        if prob >= 0.5:
            assert imagenet_maker.label(name) == imagenet_phrase(top1)
            named += 1
        else:
            assert imagenet_maker.label(name) == catalog[name].label
            unsure += 1
        assert maker.label(name) == catalog[name].label  # the hand maker is unchanged
    assert named >= 3 and unsure >= 3, (named, unsure)


def test_random_tags_name_their_segments(imagenet_maker):
    """A randomly tagged segment shows one class on all its frames and is narrated and asked about by
    that class's name; needle haystacks are never randomly tagged; the needle answer is the needle
    segment's label."""
    names = imagenet_names()
    tagged_segments = 0
    for seed in range(40):
        stream = imagenet_maker.narration_stream(random.Random(seed))
        for seg in stream.segments:
            tags = {stream.steps[i].tag for i in range(seg.start, seg.end)}
            assert len(tags) == 1
            tag = tags.pop()
            if tag is not None:
                tagged_segments += 1
                assert seg.label == imagenet_phrase(names[tag])
            else:
                assert seg.label == imagenet_maker.label(seg.media)
            assert stream.steps[seg.start].turns[0].text == sentence(seg.label)
        labels = {sentence(seg.label) for seg in stream.segments}
        for step in stream.steps:
            for turn in step.questions:
                if turn.question.startswith("What"):
                    assert turn.text in labels
        needle = imagenet_maker.needle_stream(random.Random(seed), 30)
        hay = [needle.segments[0], needle.segments[2]]
        assert all(needle.steps[i].tag is None for seg in hay for i in range(seg.start, seg.end))
        assert needle.steps[-1].turns[0].text == sentence(needle.segments[1].label)
    assert 20 <= tagged_segments, tagged_segments


def test_training_with_tags_exports_a_tagged_model(tiny_videollm, cache, tmp_path):
    from vrex.train.trainer import Recipe, train

    recipe = Recipe(steps=3, checkpoint_every=100, lr=3e-2, warmup=1, seed=2, tag_tokens=3, tag_label_fraction=1.0, random_tag_prob=0.5)
    model = _fresh(tiny_videollm)
    state = train(recipe, tmp_path / "r", out=tmp_path / "w.safetensors", resume=False, model=model, cache=cache, progress=False)
    assert state.step == 3 and model.tokens_per_frame == tiny_videollm.tokens_per_frame + 3
    weights = load_file(str(tmp_path / "w.safetensors"))
    assert weights["tag_pad"].abs().sum() > 0  # trained away from its zero start
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        assert f.metadata()["tag_tokens"] == "3" and float(f.metadata()["tag_min_prob"]) == 0.5
    # a further stage must keep the tag count of its --init
    with pytest.raises(ValueError, match="--tag-tokens 3"):
        train(Recipe(steps=1, init=str(tmp_path / "w.safetensors")), tmp_path / "r2", out=None, model=_fresh(tiny_videollm),
              cache=cache, progress=False)


def _fresh(model):
    m = copy.copy(model)
    m.lm, m.connector = copy.deepcopy(model.lm), copy.deepcopy(model.connector)
    return m


def test_tag_classes_reach_the_connector(tiny_videollm, cache):
    """A stream's forced tags change the loss input (so the label can only be learned by copying)."""
    from vrex.models.tags import equip_tags
    from vrex.train.layout import LayoutBuilder, Step, Turn, embed_layout
    from vrex.train.features import stream_features, stream_tags

    model = copy.copy(tiny_videollm)
    model.connector = copy.deepcopy(tiny_videollm.connector)
    equip_tags(model, 2)
    steps = [Step("coffee", i, i / 2, tag=None if i < 2 else 7) for i in range(4)]
    steps[2].turns.append(Turn(sentence(imagenet_phrase(imagenet_names()[7]))))
    stream = type("S", (), {"steps": steps})()
    layout = LayoutBuilder.for_model(model).build(steps)
    feats = stream_features(cache, stream)
    tags = stream_tags(stream)
    assert tags.tolist() == [-1, -1, 7, 7]
    with torch.no_grad():
        own, forced = embed_layout(model, layout, feats), embed_layout(model, layout, feats, tags)
    differs = (own != forced).any(-1).nonzero().flatten().tolist()
    starts = layout.frame_starts
    tpf = model.tokens_per_frame
    assert differs and all(starts[2] + tpf - 2 <= i < starts[2] + tpf or starts[3] + tpf - 2 <= i < starts[3] + tpf for i in differs)


def test_long_needles_that_do_not_fit_are_refused_before_training(tiny_videollm, cache, tmp_path):
    from vrex.train.trainer import Recipe, train

    tiny = _fresh(tiny_videollm)
    limit = tiny.lm.config.max_position_embeddings
    frames = limit // (tiny.tokens_per_frame + 1 + 3) + 10  # fits without tags, not with three
    assert frames * (tiny.tokens_per_frame + 1) + 100 < limit
    with pytest.raises(ValueError, match="--tag-tokens"):
        train(Recipe(steps=1, long_fraction=1.0, long_frames=(120, frames), tag_tokens=3), tmp_path / "r", out=None, model=tiny,
              cache=cache, progress=False)
