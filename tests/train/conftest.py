"""Fixtures for the LIVE-training tests: the real default model (untrained connector) and the
feature cache of the real media (built once, ~1.5 min, then read from $VREX_CACHE/train, default ~/.cache/vrex/train)."""

from __future__ import annotations

import copy

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the CI box is 2 shared cores


@pytest.fixture(scope="session")
def catalog():
    from vrex.train.data import load_catalog

    return load_catalog()


@pytest.fixture(scope="session")
def cache():
    from vrex.io import assets_dir
    from vrex.train.data import build_feature_cache

    if assets_dir() is None:
        pytest.skip("shared media not found (set VREX_ASSETS)")
    return build_feature_cache(progress=False)


@pytest.fixture(scope="session")
def maker(cache, catalog):
    from vrex.train.data import split_names
    from vrex.train.streams import StreamMaker

    return StreamMaker(cache, catalog, split_names(catalog, "train"))


@pytest.fixture()
def tiny_videollm(videollm):
    """The real tokenizer/format/encoder dims with a 2-layer LM, so training steps take milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vrex.models.connector import Connector

    cfg = LlamaConfig(vocab_size=videollm.lm.config.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = copy.copy(videollm)
    model.lm = LlamaForCausalLM(cfg).eval()
    model.connector = Connector(videollm.encoder.dim, 32, seed=0, temporal=True)
    return model
