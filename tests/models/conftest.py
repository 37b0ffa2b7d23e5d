"""Fixtures: tiny random models (see tiny_models.py), real frames, and no hub access."""

from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub.constants
import pytest
from PIL import Image

from tiny_models import CHATML, FAMILIES, LLAMA3, save_lm, save_vision

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No hub here: fail fast (instead of retrying for ~25 s) when a repo id is not in the local cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return save_lm(tmp_path_factory.mktemp("llama"), "llama", LLAMA3)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    return save_lm(tmp_path_factory.mktemp("qwen2"), "qwen2", CHATML)


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """``family_dir(name)``: the tiny model of a family of ``tiny_models.FAMILIES``, saved once per run."""
    saved: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in saved:
            saved[family] = save_lm(tmp_path_factory.mktemp(family), family)
        return saved[family]

    assert set(FAMILIES) >= {"gemma3_text", "mistral", "qwen2_sliding", "phi3", "gpt_neox"}
    return get


@pytest.fixture(scope="session")
def family_model(family_dir):
    """``family_model(name)``: that family's tiny LM + EfficientNet-Lite0 + an untrained connector, loaded once."""
    from vrex.models.videollm import load_videollm

    loaded = {}

    def get(family: str):
        if family not in loaded:
            loaded[family] = load_videollm(lm=str(family_dir(family)), connector=None)
        return loaded[family]

    return get


@pytest.fixture(scope="session")
def siglip_dir(tmp_path_factory) -> Path:
    return save_vision(tmp_path_factory.mktemp("siglip"), "siglip")


@pytest.fixture(scope="session")
def frames() -> list[Image.Image]:
    """Real photographs from the shared test assets."""
    root = Path(os.environ.get("VREX_ASSETS") or REPO.parent / "shared" / "assets") / "images"
    names = ["astronaut.png", "chelsea.png", "coffee.png", "horse.png"]
    if not all((root / n).is_file() for n in names):
        pytest.skip(f"shared test images not found in {root} (set VREX_ASSETS to the assets folder)")
    return [Image.open(root / n).convert("RGB") for n in names]
