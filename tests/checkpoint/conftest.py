import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: OpenMP threads only add overhead, and on a busy 2-core box their spinning makes
    # single ops take seconds. Restored afterwards so other test directories are unaffected.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
