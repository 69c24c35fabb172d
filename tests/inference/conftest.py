import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matmuls on a loaded 2-core box: the intra-op thread pool costs ~100x the work itself.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
