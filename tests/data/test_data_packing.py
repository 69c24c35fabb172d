"""Row layouts: position_ids, segment_ids, maskable, padding, SFT first-fit, truncation, eval split."""
import itertools
import random

import numpy as np
import pytest
import torch

from veomni.data import BATCH_KEYS, PackedDataset, build_dataset, collate
from veomni.data.packing import first_fit

PAD = 0


def _rows(ds):
    return [ds[i] for i in range(len(ds))]


def test_pretrain_packing_positions_segments(store_of):
    # Documents of lengths 3, 5, 2 (ids tell document and offset apart), rows of 4.
    docs = [[10, 11, 12], [20, 21, 22, 23, 24], [30, 31]]
    ds = PackedDataset(store_of(docs), max_seq_len=4, packing=True, pad_token_id=PAD)
    assert len(ds) == 3 and ds.num_tokens == 10
    r = _rows(ds)
    assert [x["input_ids"].tolist() for x in r] == [[10, 11, 12, 20], [21, 22, 23, 24], [30, 31, PAD, PAD]]
    # Row 0: doc A at 0..2, then doc B starts at 0. Row 1: continuation of B restarts at 0.
    assert [x["position_ids"].tolist() for x in r] == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 1]]
    assert [x["segment_ids"].tolist() for x in r] == [[1, 1, 1, 2], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert [x["attention_mask"].tolist() for x in r] == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert [x["maskable"].tolist() for x in r] == [[True] * 4, [True] * 4, [True, True, False, False]]
    # The rows together are exactly the concatenated stream.
    stream = torch.cat([x["input_ids"][x["attention_mask"].bool()] for x in r]).tolist()
    assert stream == list(itertools.chain(*docs))


def test_pretrain_no_packing_truncates_and_pads(store_of):
    ds = PackedDataset(store_of([[1, 2, 3, 4, 5, 6], [7, 8]]), max_seq_len=4, packing=False, pad_token_id=99)
    r = _rows(ds)
    assert [x["input_ids"].tolist() for x in r] == [[1, 2, 3, 4], [7, 8, 99, 99]]
    assert [x["segment_ids"].tolist() for x in r] == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert [x["position_ids"].tolist() for x in r] == [[0, 1, 2, 3], [0, 1, 0, 1]]
    assert r[1]["maskable"].tolist() == [True, True, False, False]


def test_sft_first_fit_never_splits_and_masks_prompt(store_of):
    # Lengths 6, 5, 3, 2 into rows of 8: first-fit puts (6, 2) and (5, 3) together.
    docs = [[1] * 6, [2] * 5, [3] * 3, [4] * 2]
    plens = [4, 2, 1, 1]
    ds = PackedDataset(store_of(docs, plens), max_seq_len=8, packing=True, pad_token_id=PAD)
    r = _rows(ds)
    assert [x["input_ids"].tolist() for x in r] == [[1] * 6 + [4] * 2, [2] * 5 + [3] * 3]
    assert r[0]["segment_ids"].tolist() == [1] * 6 + [2] * 2
    assert r[0]["position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    # Prompt tokens are not maskable, response + EOS (the rest of each example) are.
    assert r[0]["maskable"].tolist() == [False] * 4 + [True] * 2 + [False] + [True]
    assert r[1]["maskable"].tolist() == [False] * 2 + [True] * 3 + [False] + [True] * 2
    assert ds.truncated == 0 and ds.dropped == 0


def test_sft_truncate_and_drop(store_of):
    docs = [[1] * 10, [2] * 6, [3] * 3]
    plens = [3, 6, 1]  # doc 0 too long (truncated), doc 1 prompt fills the row (dropped)
    for packing in (True, False):
        ds = PackedDataset(store_of(docs, plens), max_seq_len=6, packing=packing, pad_token_id=PAD)
        assert (ds.truncated, ds.dropped, ds.num_docs) == (1, 1, 3)
        ids = [x["input_ids"].tolist() for x in _rows(ds)]
        assert ids == [[1] * 6, [3] * 3 + [PAD] * 3]
        assert ds[0]["maskable"].tolist() == [False] * 3 + [True] * 3
    with pytest.raises(ValueError, match="all 1 documents were dropped"):
        PackedDataset(store_of([[2] * 6], [6]), max_seq_len=6, packing=True, pad_token_id=PAD)


def test_first_fit_matches_reference():
    rng = random.Random(0)
    for _ in range(20):
        lengths = [rng.randint(1, 16) for _ in range(rng.randint(1, 60))]
        bins, ref_room = first_fit(lengths, 16), []
        for n, b in zip(lengths, bins):
            want = next((j for j, room in enumerate(ref_room) if room >= n), len(ref_room))
            if want == len(ref_room):
                ref_room.append(16)
            ref_room[want] -= n
            assert b == want


def test_collate_contract(store_of):
    ds = PackedDataset(store_of([[5, 6, 7], [8, 9]], [1, 1]), max_seq_len=4, packing=False, pad_token_id=PAD)
    batch = collate([ds[0], ds[1], ds.pad_row()])
    assert set(batch) == set(BATCH_KEYS)
    for k in ("input_ids", "position_ids", "segment_ids", "attention_mask"):
        assert batch[k].dtype == torch.long and batch[k].shape == (3, 4)
    assert batch["maskable"].dtype == torch.bool
    # Invariants the loss relies on: nothing maskable on padding; segment 0 exactly on padding.
    assert not (batch["maskable"] & (batch["attention_mask"] == 0)).any()
    assert torch.equal(batch["segment_ids"] == 0, batch["attention_mask"] == 0)
    assert batch["attention_mask"][2].sum() == 0


def test_sft_real_tokenizer_maskable_is_response(tmp_path, jsonl, qwen_tok):
    recs = [{"prompt": f"question number {i}?", "response": f"answer {i}" + " more" * i} for i in range(6)]
    ds = build_dataset(jsonl(tmp_path / "s.jsonl", recs), qwen_tok, data_type="sft", max_seq_len=48)
    assert ds.num_docs == 6 and len(ds) < 6  # several short examples share a row
    seen = []
    for row in _rows(ds):
        for s in range(1, int(row["segment_ids"].max()) + 1):
            sel = row["segment_ids"] == s
            ids, m = row["input_ids"][sel], row["maskable"][sel]
            assert row["position_ids"][sel].tolist() == list(range(int(sel.sum())))
            prompt, response = qwen_tok.decode(ids[~m]), qwen_tok.decode(ids[m])
            assert prompt.endswith("<|im_start|>assistant\n") and response.endswith(qwen_tok.eos_token)
            seen.append((prompt, response))
    for i, rec in enumerate(recs):
        assert any(rec["prompt"] in p and rec["response"] in r for p, r in seen), i


def test_split_by_document_deterministic(store_of):
    docs = [[i] * (1 + i % 3) for i in range(1, 21)]
    ds = PackedDataset(store_of(docs), max_seq_len=5, packing=True, pad_token_id=PAD)
    train, evald = ds.split(0.25, seed=3)
    train2, eval2 = ds.split(0.25, seed=3)
    assert evald.num_docs == 5 and train.num_docs == 15
    assert np.array_equal(evald.doc_ids, eval2.doc_ids) and np.array_equal(train.doc_ids, train2.doc_ids)
    assert not set(evald.doc_ids) & set(train.doc_ids)
    assert sorted(set(evald.doc_ids) | set(train.doc_ids)) == list(range(20))
    assert not np.array_equal(ds.split(0.25, seed=4)[1].doc_ids, evald.doc_ids)
    # Eval rows hold exactly the eval documents' tokens.
    ev_tokens = sorted(t for r in _rows(evald) for t in r["input_ids"][r["attention_mask"].bool()].tolist())
    assert ev_tokens == sorted(t for d in evald.doc_ids for t in docs[d])
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        ds.split(1.0, seed=0)
