"""Weighted multi-source mixtures: proportions, determinism, resume, config validation."""
import itertools
import json

import numpy as np
import pytest

from veomni.config.parser import ConfigError
from veomni.config.schema import DataArgs
from veomni.data import PackedDataset, StatefulLoader
from veomni.data.loader import build_dataloaders
from veomni.data.mixture import MixtureDataset


@pytest.fixture
def two(store_of):
    # Source A: 100 rows holding ids 1..100; source B: 300 rows holding ids 1001..1300.
    a = PackedDataset(store_of([[i + 1] for i in range(100)]), max_seq_len=2, packing=False, pad_token_id=0)
    b = PackedDataset(store_of([[1001 + i] for i in range(300)]), max_seq_len=2, packing=False, pad_token_id=0)
    return a, b


def rows_of(loader, n):
    out = []
    while len(out) < n:
        for batch in loader:
            out.extend(batch["input_ids"][:, 0].tolist())
            if len(out) >= n:
                break
    return out[:n]


def test_mixture_proportions_repeat_and_subsample(two):
    mix = MixtureDataset(two, [3, 1])
    assert len(mix) == 400 and mix.weights == [0.75, 0.25]
    order = mix.epoch_order(0, seed=1)
    got = [int(mix[int(k)]["input_ids"][0]) for k in order]
    from_a = [x for x in got if x <= 100]
    # Binomial(400, 0.75): mean 300, sd 8.7; 5 sd either side.
    assert 256 <= len(from_a) <= 344
    # A (100 rows, ~300 draws) is repeated: every row 2-4 times, never more than one extra pass apart.
    counts = np.bincount(from_a, minlength=101)[1:]
    assert counts.min() >= 2 and counts.max() <= 4
    # B (300 rows, ~100 draws) is subsampled without repeats; the next epoch takes another subset.
    from_b = [x for x in got if x > 1000]
    assert len(set(from_b)) == len(from_b)
    nxt = {int(mix[int(k)]["input_ids"][0]) for k in mix.epoch_order(1, seed=1)} - set(range(101))
    assert nxt != set(from_b)


def test_mixture_deterministic_in_seed_and_epoch(two):
    mix = MixtureDataset(two, [0.5, 0.5])
    assert np.array_equal(mix.epoch_order(0, 7), MixtureDataset(two, [1, 1]).epoch_order(0, 7))
    assert not np.array_equal(mix.epoch_order(0, 7), mix.epoch_order(0, 8))
    assert not np.array_equal(mix.epoch_order(0, 7), mix.epoch_order(1, 7))
    only_b = MixtureDataset(two, [0, 1]).epoch_order(0, 7)
    assert only_b.min() >= 100  # weight 0: never drawn


def test_mixture_loader_resume_across_dp_sizes_and_weight_check(two):
    mix = MixtureDataset(two, [3, 1])
    ref = rows_of(StatefulLoader(mix, 4, seed=2), 4 * 150)  # 100 steps per epoch: crosses into epoch 1
    ranks = [StatefulLoader(mix, 2, r, 2, seed=2, num_workers=1) for r in range(2)]
    steps = [list(itertools.chain(*s)) for s in zip(*[[rows_of(l, 2) for _ in range(30)] for l in ranks])]
    assert list(itertools.chain(*steps)) == ref[:120]
    state = json.loads(json.dumps(ranks[0].state_dict()))
    assert state["mixture"] == [[100, 0.75], [300, 0.25]]
    one = StatefulLoader(mix, 4, seed=2)
    one.load_state_dict(state)
    assert rows_of(one, 4 * 120) == ref[120:]
    with pytest.raises(ValueError, match="mixture_weights"):
        StatefulLoader(MixtureDataset(two, [1, 1]), 4, seed=2).load_state_dict(state)


def test_mixture_errors(two, store_of):
    with pytest.raises(ValueError, match="one per source"):
        MixtureDataset(two, [1])
    with pytest.raises(ValueError, match=">= 0"):
        MixtureDataset(two, [1, -1])
    with pytest.raises(ValueError, match="need mixture weights"):
        MixtureDataset(two, [])
    longer = PackedDataset(store_of([[1]]), max_seq_len=4, packing=False, pad_token_id=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        MixtureDataset([two[0], longer], [1, 1])
    with pytest.raises(ValueError, match="shuffle=False"):
        StatefulLoader(MixtureDataset(two, [1, 1]), 2, shuffle=False)


def test_streaming_mixture_proportions_and_determinism(tmp_path, jsonl, qwen_tok):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    for f in range(2):
        jsonl(tmp_path / "a" / f"{f}.jsonl", [{"text": f"alpha {i}"} for i in range(30)])
        jsonl(tmp_path / "b" / f"{f}.jsonl", [{"text": f"beta {i}"} for i in range(30)])
    build = lambda seed: build_dataloaders(None, qwen_tok, sources=[str(tmp_path / "a"), str(tmp_path / "b")],
                                           mixture_weights=[0.8, 0.2], micro_batch_size=4, max_seq_len=8, packing=False,
                                           streaming=True, num_workers=2, seed=seed)[0]
    it = iter(build(0))
    texts = [qwen_tok.decode(row[row != qwen_tok.pad_token_id].tolist()) for _ in range(100)
             for row in next(it)["input_ids"]]
    n_a = sum("alpha" in t for t in texts)
    assert n_a + sum("beta" in t for t in texts) == 400
    assert 280 <= n_a <= 360  # Binomial(400, 0.8): mean 320, sd 8
    again = iter(build(0))
    first = [next(again)["input_ids"].tolist() for _ in range(5)]
    it0 = iter(build(0))
    assert first == [next(it0)["input_ids"].tolist() for _ in range(5)]
    it1 = iter(build(1))
    assert first != [next(it1)["input_ids"].tolist() for _ in range(5)]


def test_data_args_validation():
    DataArgs(sources=["a", "b"], mixture_weights=[0.3, 0.7])
    DataArgs(sources=["a"])
    cases = [
        (dict(train_path="x", sources=["a"]), "not both"),
        (dict(sources=["a", "b"]), "need data.mixture_weights"),
        (dict(sources=["a", "b"], mixture_weights=[1.0]), "one weight per source"),
        (dict(sources=["a", "b"], mixture_weights=[1.0, -1.0]), ">= 0"),
        (dict(mixture_weights=[1.0]), "needs data.sources"),
        (dict(train_path="x", streaming=True, eval_split_ratio=0.1), "eval_path"),
        (dict(train_path="x", prefetch_factor=0), "prefetch_factor"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            DataArgs(**kwargs)
