"""Streaming rows: packer layouts, per-stream sharding, exact resume with workers, hf datasets."""
import json
import os

import numpy as np
import pytest
import torch

from veomni.data import PackedDataset, build_dataset
from veomni.data.loader import build_dataloaders
from veomni.data.packing import build_row, pack_stream
from veomni.data.readers import ReaderOptions
from veomni.data.sources import FileSource, HFSource, open_source, parse_hf_spec
from veomni.data.streaming import StreamingRows

OPTS = ReaderOptions()


def ids(batch):
    return batch["input_ids"].tolist()


def take(loader, n):
    it = iter(loader)
    return [ids(next(it)) for _ in range(n)]


def all_rows(rows_ds):
    return [build_row(p, pl, rows_ds.max_seq_len, rows_ds.pad_token_id) for p, pl in rows_ds.iter_pieces()]


def stream_loader(path, tok, **kw):
    kw = dict(dict(micro_batch_size=2, max_seq_len=16, streaming=True, seed=3), **kw)
    return build_dataloaders(path, tok, **kw)[0]


# ----------------------------------------------------------------------------- the packer
def _docs(lengths, plens=None):
    """(key, ids, prompt_len, consumed) with ids telling document and offset apart."""
    return [(k, np.arange(n) + 100 * (k + 1), None if plens is None else plens[k], 0) for k, n in enumerate(lengths)]


def _resume_docs(docs, key, consumed):
    """The documents a source re-reads from a resume key (what veomni/data/streaming.py does)."""
    out = []
    for k, ids, plen, _ in docs:
        if k < key or (k == key and consumed == -1):
            continue
        base = consumed if (k == key and consumed > 0) else 0
        out.append((k, ids[base:], plen, base))
    return out


@pytest.mark.parametrize("data_type,packing", [("pretrain", True), ("pretrain", False), ("sft", True), ("sft", False)])
def test_pack_stream_resumes_from_every_row(data_type, packing):
    lengths, plens = [3, 9, 2, 5, 7, 1, 4], [1, 2, 1, 6, 3, 0, 2]
    docs = _docs(lengths, plens if data_type == "sft" else None)
    stats = {}
    rows = list(pack_stream(docs, 6, data_type, packing, stats, flush=True))
    flat = lambda rs: [[p.tolist() for p in r[0]] for r in rs]
    for i, (_, _, (key, consumed)) in enumerate(rows):
        again = list(pack_stream(_resume_docs(docs, key, consumed), 6, data_type, packing, flush=True))
        assert flat(again) == flat(rows[i + 1:]), (i, key, consumed)
    if data_type == "sft":
        # Next-fit: an example never splits; the prompt-alone-too-long one (6 >= 6) is dropped.
        assert stats == {"dropped": 1, "truncated": 2}
        assert all(sum(len(p) for p in r[0]) <= 6 for r in rows)
        assert flat(rows)[:2] == [[[100, 101, 102]], [list(range(200, 206))]]


def test_pack_stream_pretrain_equals_in_memory_layout(store_of):
    lengths = [3, 9, 2, 5, 7, 1, 4]
    docs = _docs(lengths)
    ds = PackedDataset(store_of([d[1].tolist() for d in docs]), max_seq_len=6, packing=True, pad_token_id=0)
    rows = [build_row(p, pl, 6, 0) for p, pl, _ in pack_stream(docs, 6, "pretrain", True, flush=True)]
    assert len(rows) == len(ds)
    for i, r in enumerate(rows):
        for k in r:
            assert torch.equal(r[k], ds[i][k]), (i, k)


# ----------------------------------------------------------------------------- sources and rows
def test_units_cover_every_record_once_and_resume_anywhere(tmp_path, corpus, monkeypatch):
    import veomni.data.sources as sources
    from veomni.data.readers import iter_records

    root = corpus(tmp_path / "c", n_jsonl=2, docs_per_file=9)
    with open(os.path.join(root, "part-0.jsonl"), "a") as f:
        f.write("\n\n" + json.dumps({"text": "after blank lines"}) + "\n")
    monkeypatch.setattr(sources, "MIN_UNIT_BYTES", 40)  # JSONL byte ranges much shorter than a line
    src = FileSource(root, OPTS)
    units = src.units(num_streams=8)
    assert sum(u[0] == "jsonl" for u in units) > 10 and sum(u[0] == "parquet" for u in units) == 3
    got = [(u, p, r) for u in units for p, r, _ in src.read(u)]
    assert [r for _, _, r in got] == [r for _, _, r in iter_records(src.files, OPTS, {})]  # each once, in order
    for u in {u for u, _, _ in got}:
        mine = [(p, r) for v, p, r in got if v == u]
        for i, (p, _) in enumerate(mine):
            assert [(q, r) for q, r, _ in src.read(u, p)] == mine[i:]


def test_file_source_rows_equal_in_memory_rows(tmp_path, corpus, qwen_tok):
    root = corpus(tmp_path / "c")
    mem = build_dataset(root, qwen_tok, max_seq_len=16)  # jsonl, parquet and text, in file order
    rows_ds = StreamingRows([FileSource(root, OPTS)], qwen_tok, OPTS, 16, pad_token_id=mem.pad_token_id,
                            shuffle=False, epochs=1)
    streamed = all_rows(rows_ds)
    assert len(streamed) == len(mem) > 10
    for i, r in enumerate(streamed):
        for k in r:
            assert torch.equal(r[k], mem[i][k]), (i, k)


def test_streams_split_the_corpus_between_ranks_and_workers(tmp_path, corpus, qwen_tok):
    root = corpus(tmp_path / "c")
    # packing=False: one document per row, so rows name their documents.
    every = all_rows(StreamingRows([FileSource(root, OPTS)], qwen_tok, OPTS, 256, packing=False, shuffle=False, epochs=1))
    docs = sorted(tuple(r["input_ids"][r["attention_mask"].bool()].tolist()) for r in every)
    got = []
    for rank in range(2):
        rows_ds = StreamingRows([FileSource(root, OPTS)], qwen_tok, OPTS, 256, packing=False, seed=1, dp_rank=rank,
                                dp_size=2, epochs=1)
        got.append([tuple(r["input_ids"][r["attention_mask"].bool()].tolist()) for r in all_rows(rows_ds)])
    assert got[0] and got[1] and not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1]) == docs  # one stream epoch = every document exactly once


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_loader_resume_exact(tmp_path, corpus, qwen_tok, workers):
    root = corpus(tmp_path / "c", n_jsonl=3, docs_per_file=5, parquet_rows=8)
    ref = take(stream_loader(root, qwen_tok, num_workers=workers), 40)  # several stream epochs
    for k in (1, 6, 23):
        a = stream_loader(root, qwen_tok, num_workers=workers)
        assert take(a, k) == ref[:k]
        state = json.loads(json.dumps(a.state_dict()))  # what dataloader.json holds
        b = stream_loader(root, qwen_tok, num_workers=workers)
        b.load_state_dict(state)
        assert take(b, 40 - k) == ref[k:], k
        if k == 23:
            assert b.epoch >= 1  # streams went round their units more than once
            b.set_epoch(0)  # back to the very beginning, whatever the dataset object held
            assert take(b, 3) == ref[:3]


def test_streaming_two_ranks_gathered_state(tmp_path, corpus, qwen_tok):
    root = corpus(tmp_path / "c")
    build = lambda r, g=None: stream_loader(root, qwen_tok, num_workers=1, dp_rank=r, dp_size=2, gather=g)
    ref = [take(build(r), 12) for r in range(2)]
    assert ref[0] != ref[1]
    loaders = []
    gather = lambda mine: [{"dp_rank": r, "loader": loaders[r]._local_state()} for r in range(2)]
    loaders.extend(build(r, gather) for r in range(2))
    its = [iter(l) for l in loaders]
    for _ in range(5):
        for r in range(2):
            next(its[r])
    state = json.loads(json.dumps(loaders[0].state_dict()))
    assert state == json.loads(json.dumps(loaders[1].state_dict())) and sorted(state["ranks"]) == ["0", "1"]
    for r in range(2):
        resumed = build(r)
        resumed.load_state_dict(state)
        assert take(resumed, 7) == ref[r][5:]


def test_streaming_errors(tmp_path, corpus, qwen_tok):
    root = corpus(tmp_path / "c", n_jsonl=1, parquet_rows=0, text_files=0)  # one small JSONL file: 1 unit
    with pytest.raises(ValueError, match="unit"):
        stream_loader(root, qwen_tok, num_workers=2)
    a = stream_loader(root, qwen_tok)
    state = a.state_dict()
    other = corpus(tmp_path / "d", n_jsonl=2)
    with pytest.raises(ValueError, match="num_workers=0 but this run has num_workers=2"):
        stream_loader(other, qwen_tok, num_workers=2).load_state_dict(stream_loader(other, qwen_tok).state_dict())
    with pytest.raises(ValueError, match="other data"):
        stream_loader(other, qwen_tok).load_state_dict(state)
    with pytest.raises(ValueError, match="not a streaming one"):
        stream_loader(other, qwen_tok).load_state_dict({"epoch": 0, "position": 0})
    with pytest.raises(TypeError, match="max_steps"):
        len(a)
    with pytest.raises(ValueError, match="eval_path"):
        stream_loader(root, qwen_tok, eval_split_ratio=0.1)
    with pytest.raises(ValueError, match="unknown option 'nme'"):
        parse_hf_spec("hf:HuggingFaceFW/fineweb?nme=x")
    assert parse_hf_spec("hf:json?data_files=/a/*.jsonl&split=validation").data_files == "/a/*.jsonl"
    with pytest.raises(ValueError, match="streaming=true"):
        build_dataloaders("hf:json?data_files=x", qwen_tok, micro_batch_size=1)


# ----------------------------------------------------------------------------- hf datasets streaming
def test_hf_datasets_streaming_local_json_and_parquet(tmp_path, corpus, qwen_tok):
    pytest.importorskip("datasets")
    root = corpus(tmp_path / "c", n_jsonl=3, parquet_rows=0, text_files=0)
    pq_root = corpus(tmp_path / "p", n_jsonl=0, parquet_rows=12, text_files=0, seed=1)
    jsonl_spec = f"hf:json?data_files={root}/*.jsonl"
    src = open_source(jsonl_spec, OPTS)
    assert isinstance(src, HFSource) and src.num_shards == 3  # one shard per file
    # Every document once per epoch, the same ones the file reader sees.
    via_hf = all_rows(StreamingRows([src], qwen_tok, OPTS, 256, packing=False, shuffle=False, epochs=1))
    via_files = all_rows(StreamingRows([FileSource(root, OPTS)], qwen_tok, OPTS, 256, packing=False, shuffle=False,
                                       epochs=1))
    assert [r["input_ids"].tolist() for r in via_hf] == [r["input_ids"].tolist() for r in via_files]
    # Exact resume with two workers (one stream per datasets shard subset), a parquet source mixed in.
    build = lambda: build_dataloaders(None, qwen_tok, sources=[jsonl_spec, f"hf:{pq_root}"], mixture_weights=[1, 1],
                                      micro_batch_size=2, max_seq_len=16, streaming=True, num_workers=2, seed=5)[0]
    with pytest.raises(ValueError, match="unit"):
        build()  # the parquet directory is a single datasets shard: not enough for 2 workers
    build = lambda: build_dataloaders(None, qwen_tok, sources=[jsonl_spec, f"hf:json?data_files={root}/part-[01].jsonl"],
                                      mixture_weights=[3, 1], micro_batch_size=2, max_seq_len=16, streaming=True,
                                      num_workers=2, seed=5)[0]
    ref = take(build(), 16)
    a = build()
    assert take(a, 7) == ref[:7]
    b = build()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert take(b, 9) == ref[7:]
