"""Kill a loader with num_workers=2 mid-epoch and resume from its last state.

The child (loader_child.py) iterates a training loader with two DataLoader workers and writes the
state after each batch, as a checkpoint would; it is SIGKILLed (workers too, by pid) while its
workers hold prefetched batches. A fresh loader that loads the last written state must yield
exactly the batches the child had not delivered: for in-memory data, for streaming shards (JSONL +
parquet + text files read lazily) and for a mixture of packed shards and in-memory data.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
_spec = importlib.util.spec_from_file_location("loader_child", HERE / "loader_child.py")
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)


def _kill_after(spec, tmp_path, n):
    """Run the child until it delivered ``n`` batches, SIGKILL it and its workers; (batches, last state)."""
    spec_path, out, err = tmp_path / "spec.json", tmp_path / "out.jsonl", tmp_path / "child.err"
    spec_path.write_text(json.dumps(dict(spec, stop_after=n)))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    with open(err, "w") as ef:
        proc = subprocess.Popen([sys.executable, str(HERE / "loader_child.py"), str(spec_path), str(out)], env=env,
                                stdout=ef, stderr=ef)
    workers = []
    try:
        deadline = time.time() + 300
        while not (out.exists() and out.read_text().endswith("WAITING\n")):
            assert proc.poll() is None, f"child exited {proc.returncode}:\n{err.read_text()[-3000:]}"
            assert time.time() < deadline, "child did not deliver its batches in time"
            time.sleep(0.1)
        workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(workers) >= 2, workers  # the two DataLoader workers are alive, batches prefetched
    finally:
        for pid in [proc.pid, *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    lines = [json.loads(line) for line in out.read_text().splitlines()[:-1]]
    assert len(lines) == n
    return [line["batch"] for line in lines], lines[-1]["state"]


def _take(loader, n):
    it = child.batches(loader)
    return [child.digest(next(it)) for _ in range(n)]


def _check(spec, tmp_path, tok, total, k):
    ref = _take(child.build(spec, tok), total)
    got, state = _kill_after(spec, tmp_path, k)
    assert got == ref[:k]
    resumed = child.build(spec, tok)
    resumed.load_state_dict(state)
    assert _take(resumed, total - k) == ref[k:]


COMMON = dict(micro_batch_size=2, max_seq_len=16, num_workers=2, seed=3)


def test_kill_and_resume_in_memory(tmp_path, corpus, qwen_tok):
    root = corpus(tmp_path / "c")
    spec = {"train_path": root, "kwargs": dict(COMMON, cache_dir=str(tmp_path / "cache"))}
    n = len(child.build(spec, qwen_tok))
    _check(spec, tmp_path, qwen_tok, total=n + 4, k=n // 2)  # killed mid-epoch, resumed across the epoch end


def test_kill_and_resume_streaming_shards(tmp_path, corpus, qwen_tok):
    root = corpus(tmp_path / "c", n_jsonl=3, docs_per_file=5, parquet_rows=8)
    spec = {"train_path": root, "kwargs": dict(COMMON, streaming=True)}
    _check(spec, tmp_path, qwen_tok, total=40, k=13)  # streams pass their epoch end after the resume


def test_kill_and_resume_packed_mixture(tmp_path, corpus, qwen_tok):
    from veomni.data.readers import ReaderOptions
    from veomni.data.shards import pack
    from veomni.data.sources import FileSource

    packed = tmp_path / "packed"
    pack(FileSource(corpus(tmp_path / "a"), ReaderOptions()), qwen_tok, packed, max_seq_len=16, rows_per_shard=7,
         progress=False)
    other = corpus(tmp_path / "b", seed=1, parquet_rows=0)
    spec = {"kwargs": dict(COMMON, sources=[str(packed), other], mixture_weights=[0.7, 0.3],
                           cache_dir=str(tmp_path / "cache"))}
    loader = child.build(spec, qwen_tok)
    n = len(loader)
    _check(spec, tmp_path, qwen_tok, total=n + 3, k=n - 2)
