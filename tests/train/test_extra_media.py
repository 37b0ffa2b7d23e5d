"""Extra training media (`vrex train --extra-media`): catalogs, Debian's opencv-doc examples, the trainer."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from vrex.train.data import CATALOG, FeatureCache, load_catalog, media_frames, training_catalog
from vrex.train.metrics import names_subject

OPENCV = Path(__file__).resolve().parents[2] / "vrex" / "train" / "media-opencv-doc.json"


def _write(tmp_path, name: str, media: dict) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"media": media}))
    return path


MEADOW = {"kind": "image", "file": "images/meadow_cube.jpg", "label": "a cube on a meadow", "keywords": ["cube", "meadow"], "split": "train"}


def test_extra_catalog_adds_training_media_only(tmp_path):
    base = load_catalog()
    merged = training_catalog((_write(tmp_path, "ok", {"meadow": MEADOW}),))
    assert set(merged) == set(base) | {"meadow"} and merged["meadow"].source == "shared"
    with pytest.raises(ValueError, match=r"names already in the catalog: \['owl'\]"):
        training_catalog((_write(tmp_path, "clash", {"owl": MEADOW}),))
    with pytest.raises(ValueError, match=r"only training media.*\['meadow'\]"):
        training_catalog((_write(tmp_path, "held", {"meadow": MEADOW | {"split": "heldout"}}),))
    with pytest.raises(ValueError, match="bad entry meadow"):
        training_catalog((_write(tmp_path, "src", {"meadow": MEADOW | {"source": "flickr"}}),))
    with pytest.raises(ValueError, match="not a JSON file"):
        training_catalog((tmp_path / "missing.json",))


@pytest.mark.parametrize("catalog", [CATALOG, OPENCV], ids=["media.json", "media-opencv-doc.json"])
def test_every_hand_label_names_its_subject(catalog):
    """A label must pass its own keyword rule, or narration accuracy could never credit it."""
    entries = load_catalog(catalog)
    labelled = {n: m for n, m in entries.items() if m.label}
    assert labelled
    assert [n for n, m in labelled.items() if not names_subject(m.label, m.keywords)] == []


def test_opencv_doc_media_are_fetched_and_decode():
    """The real path: apt-get download opencv-doc (once, ~10 s) and every listed file opens."""
    from vrex.train.data import media_path
    from vrex.train.debian_media import opencv_doc_examples

    root = opencv_doc_examples()
    extra = load_catalog(OPENCV)
    assert len(extra) >= 30 and {m.source for m in extra.values()} == {"opencv-doc"}
    assert all(media_path(m).is_relative_to(root) for m in extra.values())
    from PIL import Image

    for m in extra.values():
        if m.kind == "image":
            with Image.open(media_path(m)) as im:
                assert min(im.size) >= 64, m.name
    frames = media_frames(extra["cv_tree_below"])  # a clip (the stills only need to open)
    assert len(frames) >= 4 and frames[0].size[0] >= 64


def test_trainer_reads_the_extra_media(tiny_videollm, cache, tmp_path):
    """The recipe's extra media reach the trainer: a cache without them is refused by name, one with them trains."""
    from vrex.models.encoders import load_encoder
    from vrex.train.data import training_catalog
    from vrex.train.trainer import Recipe, train

    extra = _write(tmp_path, "extra", {"meadow": MEADOW})
    recipe = Recipe(steps=2, checkpoint_every=100, warmup=1, extra_media=(str(extra),), needle_fraction=0.0)
    model = copy.copy(tiny_videollm)
    model.lm, model.connector = copy.deepcopy(tiny_videollm.lm), copy.deepcopy(tiny_videollm.connector)
    with pytest.raises(ValueError, match=r"no frames of \['meadow'\]"):
        train(recipe, tmp_path / "r0", out=None, model=model, cache=cache, progress=False)
    encoder = load_encoder()
    import torch

    frames = media_frames(training_catalog((extra,))["meadow"])
    with torch.no_grad():
        feats, probs = encoder(frames).half(), encoder.classify(frames).half()
    more = FeatureCache(cache.features | {"meadow": feats}, cache.probs | {"meadow": probs}, cache.encoder, "test")
    state = train(recipe, tmp_path / "r", out=tmp_path / "w.safetensors", model=model, cache=more, progress=False)
    assert state.step == 2
    record = json.loads((tmp_path / "w.json").read_text())
    assert record["recipe"]["extra_media"] == [str(extra)]
