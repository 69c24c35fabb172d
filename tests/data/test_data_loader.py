"""StatefulLoader: deterministic shuffle, dp sharding, exact resume (also across dp sizes), eval."""
import itertools

import pytest
import torch

from veomni.data import PackedDataset, StatefulLoader
from veomni.data.loader import build_dataloaders

N_ROWS = 23


@pytest.fixture
def ds(store_of):
    # packing=False with one-token documents: row i holds token id i + 1 (0 is the pad id).
    return PackedDataset(store_of([[i + 1] for i in range(N_ROWS)]), max_seq_len=2, packing=False, pad_token_id=0)


def row_ids(batch):
    """Row index of each row in a batch (-1 for an all-padding row)."""
    return (batch["input_ids"][:, 0] - 1).tolist()


def take(loader, n):
    """The next n batches as row-id lists, crossing epoch boundaries like a trainer would."""
    out = []
    while len(out) < n:
        for b in loader:
            out.append(row_ids(b))
            if len(out) == n:
                break
    return out


def step_union(loaders, n):
    """Per step, the rows all ranks together got (rank order concatenated)."""
    per_rank = [take(l, n) for l in loaders]
    return [list(itertools.chain(*step)) for step in zip(*per_rank)]


def test_shuffle_deterministic_per_epoch(ds):
    a = StatefulLoader(ds, micro_batch_size=4, seed=7)
    b = StatefulLoader(ds, micro_batch_size=4, seed=7)
    assert len(a) == N_ROWS // 4
    ea, eb = take(a, 2 * len(a)), take(b, 2 * len(b))
    assert ea == eb
    first, second = ea[:len(a)], ea[len(a):]
    assert first != second  # a new permutation each epoch
    assert len(set(itertools.chain(*first))) == 4 * len(a)  # no repeats inside an epoch
    assert take(StatefulLoader(ds, 4, seed=8), len(a)) != first
    assert take(StatefulLoader(ds, 4, shuffle=False), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_dp_shards_disjoint_and_cover_global_batch(ds):
    single = StatefulLoader(ds, micro_batch_size=6, dp_size=1, seed=1)
    ranks = [StatefulLoader(ds, micro_batch_size=2, dp_rank=r, dp_size=3, seed=1) for r in range(3)]
    assert len(single) == len(ranks[0]) == 3
    want = take(single, 3)
    per_rank = [take(l, 3) for l in ranks]
    for step in range(3):
        got = [per_rank[r][step] for r in range(3)]
        flat = list(itertools.chain(*got))
        assert len(set(flat)) == len(flat)  # disjoint
        assert flat == want[step]  # together exactly the global batch


def test_resume_exact(ds):
    ref = take(StatefulLoader(ds, micro_batch_size=3, seed=5), 12)  # crosses the epoch boundary (7/epoch)
    for k in (0, 1, 4, 7, 9):
        a = StatefulLoader(ds, micro_batch_size=3, seed=5)
        assert take(a, k) == ref[:k]
        state = a.state_dict()
        b = StatefulLoader(ds, micro_batch_size=3, seed=5)
        b.load_state_dict(state)
        assert take(b, 12 - k) == ref[k:], k


def test_resume_with_different_dp_size(ds):
    # Global batch of 4 rows per step: 2 ranks x 2, then 4 ranks x 1, then 1 rank x 4.
    ref = step_union([StatefulLoader(ds, 2, r, 2, seed=9) for r in range(2)], 8)
    first = [StatefulLoader(ds, 2, r, 2, seed=9) for r in range(2)]
    assert step_union(first, 3) == ref[:3]
    state = first[0].state_dict()
    assert state == first[1].state_dict()  # stored in global rows, identical on every rank
    four = [StatefulLoader(ds, 1, r, 4, seed=9) for r in range(4)]
    for l in four:
        l.load_state_dict(state)
    assert step_union(four, 2) == ref[3:5]
    one = StatefulLoader(ds, 4, 0, 1, seed=9)
    one.load_state_dict(four[0].state_dict())
    assert take(one, 3) == ref[5:8]


def test_state_after_last_batch_of_epoch(ds):
    a = StatefulLoader(ds, micro_batch_size=5, seed=0)
    batches = [row_ids(b) for b in a]  # runs the epoch to the end; the epoch counter advances
    assert len(batches) == 4 and a.epoch == 1 and a.position == 0
    b = StatefulLoader(ds, micro_batch_size=5, seed=0)
    it = iter(b)
    for _ in range(4):
        next(it)
    state = b.state_dict()  # taken while holding the epoch's last batch
    assert state["epoch"] == 0 and state["position"] == 20
    c = StatefulLoader(ds, micro_batch_size=5, seed=0)
    c.load_state_dict(state)
    assert take(c, 1) == take(a, 1)


def test_drop_last_false_pads_with_empty_rows(ds):
    loaders = [StatefulLoader(ds, 4, r, 2, shuffle=False, drop_last=False) for r in range(2)]
    assert len(loaders[0]) == 3  # 23 rows, 8 per global batch
    steps = step_union(loaders, 3)
    assert steps[2] == [16, 17, 18, 19, 20, 21, 22, -1]
    real = sorted(r for s in steps for r in s if r >= 0)
    assert real == list(range(N_ROWS))
    # The short last global batch is completed with all-padding rows on the last rank.
    l1 = StatefulLoader(ds, 4, 1, 2, shuffle=False, drop_last=False)
    last = [b for b in l1][-1]
    assert row_ids(last) == [20, 21, 22, -1] and last["input_ids"].shape == (4, 2)
    assert not last["maskable"][-1].any() and last["attention_mask"][-1].sum() == 0


def test_bad_arguments_and_state_mismatch(ds):
    with pytest.raises(ValueError, match="dp_rank"):
        StatefulLoader(ds, 2, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="fewer than one global micro-batch"):
        StatefulLoader(ds, 8, dp_size=3)
    state = StatefulLoader(ds, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1 but this loader has seed=2"):
        StatefulLoader(ds, 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="streaming one"):
        StatefulLoader(ds, 2, seed=1).load_state_dict({"kind": "streaming"})


def test_workers_give_the_same_batches_and_resume_across_worker_counts(ds):
    ref = take(StatefulLoader(ds, 3, seed=5), 12)  # crosses the epoch end (7 per epoch)
    two = StatefulLoader(ds, 3, seed=5, num_workers=2, prefetch_factor=3)
    a, b = next(iter(StatefulLoader(ds, 3, seed=5))), next(iter(StatefulLoader(ds, 3, seed=5, num_workers=1)))
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a) and list(a) == list(b)
    assert take(two, 5) == ref[:5]  # workers prefetch ahead; the state counts delivered batches only
    state = two.state_dict()
    assert state["position"] == 15
    one = StatefulLoader(ds, 3, seed=5, num_workers=1)
    one.load_state_dict(state)
    assert take(one, 7) == ref[5:]
    # Reloading a state into a loader that is mid-iteration drops the prefetched batches.
    two.load_state_dict(state)
    assert take(two, 7) == ref[5:]


def test_build_dataloaders_eval_split_and_path(tmp_path, jsonl, qwen_tok):
    train = jsonl(tmp_path / "t.jsonl", [{"text": f"document number {i}"} for i in range(20)])
    evalf = jsonl(tmp_path / "e.jsonl", [{"text": "held out text"}])
    tr, ev = build_dataloaders(train, qwen_tok, micro_batch_size=2, max_seq_len=8, eval_split_ratio=0.2, seed=0)
    assert tr.dataset.num_docs == 16 and ev.dataset.num_docs == 4 and not ev.shuffle and not ev.drop_last
    batch = next(iter(tr))
    assert batch["input_ids"].shape == (2, 8) and batch["maskable"].dtype == torch.bool
    tr2, ev2 = build_dataloaders(train, qwen_tok, micro_batch_size=2, max_seq_len=8, eval_path=evalf,
                                 eval_micro_batch_size=1)
    assert ev2.dataset.num_docs == 1 and ev2.micro_batch_size == 1
    tr3, ev3 = build_dataloaders(train, qwen_tok, micro_batch_size=2, max_seq_len=8)
    assert ev3 is None
    with pytest.raises(ValueError, match="either eval_path or eval_split_ratio"):
        build_dataloaders(train, qwen_tok, micro_batch_size=2, eval_path=evalf, eval_split_ratio=0.1)
