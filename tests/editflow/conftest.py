"""Tiny tensors on one thread (see tests/conftest.py::one_thread), and the trainer tests' tiny model
(SmolLM2 tokenizer) and corpus for the EditFlow end-to-end test."""
import pytest

from tests.trainer.conftest import tiny_corpus, tiny_model_dir  # noqa: F401


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
