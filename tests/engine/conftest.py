"""Shared fixtures: the real default model (SmolLM2-135M + EfficientNet-Lite0) and real photos."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from vrex.io import assets_dir


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    root = assets_dir()
    if root is None:
        pytest.skip("shared test media not found (set VREX_ASSETS to the assets folder)")
    names = ["astronaut.png", "chelsea.png", "coffee.png", "horse.png", "camera.png", "parrot.jpg", "owl.jpg"]
    return [Image.open(Path(root) / "images" / n).convert("RGB") for n in names]
