"""ImageNet tag tokens: a frame's top-1 class name as LM token embeddings after its visual tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from vrex.io import assets_dir
from vrex.models.tags import build_imagenet_tags, equip_tags, imagenet_names, imagenet_phrase


@pytest.fixture(scope="module")
def bird():
    root = assets_dir()
    if root is None:
        pytest.skip("shared media not found (set VREX_ASSETS)")
    return Image.open(root / "images" / "bird.bmp")


def tagged(videollm, k: int = 3, min_prob: float = 0.5):
    model = copy.copy(videollm)
    model.connector = copy.deepcopy(videollm.connector)
    equip_tags(model, k, min_prob)
    return model


def test_names_and_phrases():
    names = imagenet_names()
    assert len(names) == 1000 and len(set(names)) > 990
    assert names[0] == "tench" and names[19] == "chickadee"
    assert imagenet_phrase("Egyptian cat") == "an Egyptian cat" and imagenet_phrase("chickadee") == "a chickadee"


def test_tag_tokens_are_the_top1_name_as_text(videollm, bird):
    """A confidently classified frame carries its class name's token embeddings; a name shorter than
    k is padded with the connector's pad vector; the visual tokens are unchanged."""
    plain = videollm.embed_frames([bird])
    model = tagged(videollm, k=4)
    assert model.tokens_per_frame == videollm.tokens_per_frame + 4
    out = model.embed_frames([bird])
    assert out.shape == (1, videollm.tokens_per_frame + 4, plain.shape[-1])
    torch.testing.assert_close(out[:, :videollm.tokens_per_frame], plain)
    cls, prob = model.connector.tags.top1(model.encode_frames([bird])[:, 0])
    assert cls.item() == int(videollm.encoder.classify([bird]).argmax()) and prob.item() > 0.5
    name = model.embed_text(model.tokenize(" " + imagenet_names()[cls.item()]))
    n = name.shape[0]
    assert 1 <= n < 4
    torch.testing.assert_close(out[0, videollm.tokens_per_frame:videollm.tokens_per_frame + n], name)
    model.connector.tag_pad.data.fill_(0.25)
    padded = model.embed_frames([bird])[0, videollm.tokens_per_frame + n:]
    assert torch.equal(padded, torch.full_like(padded, 0.25))


def test_unsure_frames_show_no_tag_and_forced_classes_show(videollm, bird):
    model = tagged(videollm, k=3, min_prob=0.999)  # the bird's top-1 is ~0.93: below, so pads only
    model.connector.tag_pad.data.fill_(-1.0)
    feats = model.encode_frames([bird])
    out = model.connector(feats)
    assert torch.equal(out[0, -3:], torch.full_like(out[0, -3:], -1.0))
    forced = model.connector(feats, tag_classes=torch.tensor([0]))  # "tench", shown whatever the probability
    torch.testing.assert_close(forced[0, -3:][:len(model.tokenize(" tench"))], model.embed_text(model.tokenize(" tench")))


def test_weight_file_rebuilds_the_tag_head(videollm, bird, tmp_path):
    """The file records k and min_prob, not the frozen head; load_videollm rebuilds it."""
    from vrex.models.videollm import load_videollm

    model = tagged(videollm, k=3, min_prob=0.4)
    model.connector.tag_pad.data.normal_()
    model.connector.save(tmp_path / "c.safetensors")
    loaded = load_videollm(connector=tmp_path / "c.safetensors")
    assert loaded.connector.tag_tokens == 3 and loaded.connector.tag_min_prob == 0.4
    assert loaded.tokens_per_frame == videollm.tokens_per_frame + 3
    torch.testing.assert_close(loaded.embed_frames([bird]), model.embed_frames([bird]))
    # a plain file turns tag tokens off again
    videollm.connector.save(tmp_path / "plain.safetensors")
    assert loaded.connector.load(tmp_path / "plain.safetensors").tag_tokens == 0


def test_missing_head_and_unsuitable_encoder_are_refused(videollm):
    from vrex.models.connector import Connector

    conn = Connector(videollm.encoder.dim, videollm.lm.config.hidden_size, temporal=True, tag_tokens=2)
    with pytest.raises(RuntimeError, match="no tag head"):
        conn(torch.zeros(1, videollm.tokens_per_frame, videollm.encoder.dim))
    with pytest.raises(ValueError, match="ImageNet classifier"):
        build_imagenet_tags(torch.nn.Identity(), videollm.lm, videollm.tokenizer, 3)
    with pytest.raises(ValueError, match="min_prob"):
        conn.set_tag_tokens(2, 1.5)


def test_session_feeds_tag_tokens(videollm, bird):
    """The streaming session prefills tokens_per_frame (visual + tags) + interval per silent frame."""
    from vrex.engine.session import SessionConfig, StreamingSession
    from vrex.kv.policies import make_policy

    model = tagged(videollm, k=3)
    session = StreamingSession(model, make_policy("full"), SessionConfig(theta=0.0))  # never speaks
    start = session.cached_tokens
    session.push_frame(0.0, bird)
    session.push_frame(0.5, bird)
    assert session.cached_tokens - start == 2 * model.tokens_per_frame + 1  # interval owed by the last frame is pending


@pytest.mark.parametrize("variant", ["tags", "narrate"])
def test_shipped_tags_model_names_a_subject_it_was_never_taught(videollm, bird, variant):
    """The shipped variants with tag tokens (connector + tag tokens + LoRA): 'tags', and 'narrate' (the default,
    'tags' trained further on long narration streams), asked about a held-out photo whose subject no training
    label names: each answers with the tag's ImageNet name (chickadee)."""
    from vrex.engine.session import SessionConfig, StreamingSession
    from vrex.kv.policies import make_policy
    from vrex.models.videollm import DEFAULT_VARIANT, SHIPPED_VARIANTS, load_videollm, shipped_connector
    from vrex.train.data import still_views

    if shipped_connector(videollm.encoder.name, "smollm2-135m", SHIPPED_VARIANTS[variant]) is None:
        pytest.skip(f"the {variant} weights are not shipped in this checkout")
    model = load_videollm(connector=variant)
    if variant == DEFAULT_VARIANT:  # "auto", vrex run's default, is this model
        assert load_videollm().connector.source == model.connector.source
    assert model.connector.tag_tokens == 2 and model.tokens_per_frame == videollm.tokens_per_frame + 2
    assert "10 tokens/frame + 2 ImageNet tag tokens" in model.describe()
    assert any("LoRA" in n for n in model.notes)  # adapters loaded (and merged)
    session = StreamingSession(model, make_policy("full"), SessionConfig(theta=0.0))  # silent: only the question speaks
    for i, view in enumerate(still_views(bird)[:6]):
        session.push_frame(i / 2, view)
    answers = [e.text for e in session.ask("What is shown now?") if e.kind == "answer"]
    assert answers and "chickadee" in answers[0].lower(), answers
    plain = StreamingSession(load_videollm(connector="long"), make_policy("full"), SessionConfig(theta=0.0))
    for i, view in enumerate(still_views(bird)[:6]):
        plain.push_frame(i / 2, view)
    assert "chickadee" not in " ".join(e.text for e in plain.ask("What is shown now?")).lower()  # without tags it cannot
