"""Packed token shards: round trip, manifest, idempotent and resumable packing, checks, CLI."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from veomni.data import build_dataset
from veomni.data.loader import build_dataloaders
from veomni.data.packing import build_row
from veomni.data.readers import ReaderOptions
from veomni.data.shards import PackedShardDataset, ShardWriter, pack, read_manifest
from veomni.data.sources import FileSource
from veomni.data.streaming import StreamingRows
from veomni.data.tokenization import tokenizer_fingerprint

REPO = Path(__file__).resolve().parents[2]


def _rows(ds):
    return [ds[i] for i in range(len(ds))]


def _same(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        for k in x:
            assert torch.equal(x[k], y[k]), (i, k)


def _files(path):
    return {f: (os.path.getmtime(os.path.join(path, f)), open(os.path.join(path, f), "rb").read())
            for f in sorted(os.listdir(path)) if f.startswith("shard-")}


def test_pack_round_trip_equals_streaming_and_in_memory_rows(tmp_path, corpus, qwen_tok):
    root = corpus(tmp_path / "c")
    src = FileSource(root, ReaderOptions())
    man = pack(src, qwen_tok, tmp_path / "p", max_seq_len=16, rows_per_shard=7, progress=False)
    assert man["complete"] and man["max_seq_len"] == 16 and man["data_type"] == "pretrain"
    assert man["tokenizer"]["fingerprint"] == tokenizer_fingerprint(qwen_tok)
    assert len(man["shards"]) == -(-man["rows"] // 7) and sum(s["rows"] for s in man["shards"]) == man["rows"]
    ds = PackedShardDataset(tmp_path / "p", max_seq_len=16, tokenizer=qwen_tok)
    assert len(ds) == man["rows"] and ds.num_tokens == man["tokens"]
    rows = _rows(ds)
    pad = qwen_tok.pad_token_id if qwen_tok.pad_token_id is not None else qwen_tok.eos_token_id
    streamed = StreamingRows([FileSource(root, ReaderOptions())], qwen_tok, ReaderOptions(), 16, pad_token_id=pad,
                             shuffle=False, epochs=1)
    _same(rows, [build_row(p, pl, 16, pad) for p, pl in streamed.iter_pieces()])
    _same(rows, _rows(build_dataset(root, qwen_tok, max_seq_len=16)))  # pretrain: the in-memory layout too
    assert sum(int(r["attention_mask"].sum()) for r in rows) == man["tokens"]
    # build_dataset recognises the directory; workers give the same batches as the main process.
    assert isinstance(build_dataset(str(tmp_path / "p"), qwen_tok, max_seq_len=16), PackedShardDataset)
    batches = lambda w: [b["input_ids"].tolist() for b in build_dataloaders(
        str(tmp_path / "p"), qwen_tok, micro_batch_size=3, max_seq_len=16, num_workers=w, seed=4)[0]]
    assert batches(2) == batches(0) and len(batches(0)) == man["rows"] // 3


def test_pack_sft_keeps_prompt_masks(tmp_path, jsonl, qwen_tok):
    recs = [{"prompt": f"question {i} " * (i % 4 + 1), "response": f"answer {i}"} for i in range(12)]
    path = jsonl(tmp_path / "s.jsonl", recs)
    opts = ReaderOptions(data_type="sft")
    pack(FileSource(path, opts), qwen_tok, tmp_path / "p", max_seq_len=48, progress=False)
    ds = PackedShardDataset(tmp_path / "p", max_seq_len=48, data_type="sft")
    pad = qwen_tok.pad_token_id if qwen_tok.pad_token_id is not None else qwen_tok.eos_token_id
    streamed = StreamingRows([FileSource(path, opts)], qwen_tok, opts, 48, pad_token_id=pad, shuffle=False, epochs=1)
    rows = _rows(ds)
    _same(rows, [build_row(p, pl, 48, pad) for p, pl in streamed.iter_pieces()])
    assert all((~r["maskable"][r["segment_ids"] == 1]).any() for r in rows)  # prompts not maskable
    with pytest.raises(ValueError, match="data_type"):
        PackedShardDataset(tmp_path / "p", data_type="pretrain")


def test_pack_is_idempotent_and_resumes_after_a_crash(tmp_path, corpus, qwen_tok, monkeypatch):
    root = corpus(tmp_path / "c")
    src = lambda: FileSource(root, ReaderOptions())
    whole = tmp_path / "whole"
    pack(src(), qwen_tok, whole, max_seq_len=16, rows_per_shard=5, progress=False)
    before = _files(whole)
    again = pack(src(), qwen_tok, whole, max_seq_len=16, rows_per_shard=5, progress=False)
    assert again["complete"] and _files(whole) == before  # nothing rewritten

    real_flush, calls = ShardWriter.flush, []

    def crashing_flush(self):
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        calls.append(1)
        real_flush(self)

    monkeypatch.setattr(ShardWriter, "flush", crashing_flush)
    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        pack(src(), qwen_tok, crashed, max_seq_len=16, rows_per_shard=5, progress=False)
    man = read_manifest(crashed)
    assert not man["complete"] and len(man["shards"]) == 3 and man["resume"] is not None
    with pytest.raises(ValueError, match="did not finish"):
        PackedShardDataset(crashed)
    monkeypatch.setattr(ShardWriter, "flush", real_flush)
    pack(src(), qwen_tok, crashed, max_seq_len=16, rows_per_shard=5, progress=False)
    assert {f: b for f, (_, b) in _files(crashed).items()} == {f: b for f, (_, b) in before.items()}
    done = read_manifest(crashed)
    assert {k: v for k, v in done.items() if k != "resume"} == {k: v for k, v in read_manifest(whole).items()
                                                                 if k != "resume"}


def test_pack_and_training_checks(tmp_path, corpus, qwen_tok):
    root = corpus(tmp_path / "c")
    pack(FileSource(root, ReaderOptions()), qwen_tok, tmp_path / "p", max_seq_len=16, progress=False)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        build_dataset(str(tmp_path / "p"), qwen_tok, max_seq_len=32)
    with pytest.raises(ValueError, match="other max_seq_len"):
        pack(FileSource(root, ReaderOptions()), qwen_tok, tmp_path / "p", max_seq_len=32, progress=False)
    with open(os.path.join(root, "part-0.jsonl"), "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    with pytest.raises(ValueError, match="input_fingerprint"):
        pack(FileSource(root, ReaderOptions()), qwen_tok, tmp_path / "p", max_seq_len=16, progress=False)
    man = pack(FileSource(root, ReaderOptions()), qwen_tok, tmp_path / "p", max_seq_len=16, progress=False,
               overwrite=True)
    assert man["complete"]
    other = type(qwen_tok).from_pretrained(qwen_tok.name_or_path)
    other.add_tokens(["<extra_tok>"])
    with pytest.raises(ValueError, match="another tokenizer"):
        build_dataset(str(tmp_path / "p"), other, max_seq_len=16)
    with pytest.raises(ValueError, match="eval_path"):
        build_dataloaders(str(tmp_path / "p"), qwen_tok, micro_batch_size=1, max_seq_len=16, eval_split_ratio=0.1)


def test_pack_data_script(tmp_path, corpus, smollm2_dir):
    spec = importlib.util.spec_from_file_location("pack_data", REPO / "scripts" / "pack_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    root = corpus(tmp_path / "c")
    out = tmp_path / "packed"
    argv = ["--input", os.path.join(root, "part-*.jsonl"), os.path.join(root, "doc-0.txt"), "--output", str(out),
            "--tokenizer", str(smollm2_dir), "--max_seq_len", "32", "--rows_per_shard", "4", "--no_progress"]
    assert script.main(argv) == 0
    man = read_manifest(out)
    assert man["complete"] and man["rows"] > 4 and len(man["shards"]) > 1
    # The tokenizer training builds (with the mask token added) matches the manifest.
    from veomni.models.hf_io import load_tokenizer

    tok = load_tokenizer(str(smollm2_dir))
    if tok.mask_token is None:
        tok.add_special_tokens({"mask_token": "<|mask|>"})
    ds = PackedShardDataset(out, max_seq_len=32, tokenizer=tok)
    docs = [json.loads(line)["text"] for f in ("part-0.jsonl", "part-1.jsonl") for line in open(os.path.join(root, f))]
    text = tok.decode(torch.cat([r["input_ids"][r["attention_mask"].bool()] for r in _rows(ds)]).tolist())
    assert all(d in text for d in docs)
    assert script.main(argv) == 0  # finished: nothing to do
