"""Suite-wide settings and fixtures."""

import os

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
