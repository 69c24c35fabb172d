"""Shared fixtures for the evaluation tests: where the benchmark data lives."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# The data sits beside the checkout (../shared/data/eval) in this project's CI; $VEOMNI_EVAL_DATA wins.
_DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "eval"


def eval_data_dir():
    env = os.environ.get("VEOMNI_EVAL_DATA")
    return Path(env) if env else _DEFAULT_DATA


@pytest.fixture(scope="session")
def data_dir():
    path = eval_data_dir()
    if not (path / "evalplus" / "HumanEvalPlus.jsonl.gz").is_file():
        pytest.skip(f"evaluation data not found at {path} (set VEOMNI_EVAL_DATA or run "
                    "scripts/download_eval_data.sh)")
    return path


@pytest.fixture(scope="session")
def full_eval():
    """VEOMNI_FULL_EVAL=1 scores every problem instead of the fixed CI subset."""
    return os.environ.get("VEOMNI_FULL_EVAL") == "1"
