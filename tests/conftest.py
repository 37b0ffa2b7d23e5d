"""Suite-wide settings."""

import os

import torch

# `make test` runs two pytest workers on a 2-core machine: one intra-op thread each avoids the
# oversubscription that made a single EfficientNet frame take seconds instead of ~60 ms.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by CLI subprocesses
