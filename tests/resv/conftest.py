import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """These tests run many tiny tensor ops; with 2 cores under load, intra-op threads only add
    contention (an index_add_ of 12 rows: ~4 us on one thread, ~0.5 ms on two). Restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
