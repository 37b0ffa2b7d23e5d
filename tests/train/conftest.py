"""Fixtures for the LIVE-training tests: the real default model (untrained connector) and the
feature cache of the real media (built once, ~1.5 min, then read from $VREX_CACHE/train, default ~/.cache/vrex/train)."""

from __future__ import annotations

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
