import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # tiny tensors: see tests/conftest.py::one_thread
    yield
