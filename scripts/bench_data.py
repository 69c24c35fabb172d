"""Training data loader throughput, side by side with the training step it has to feed.

    python scripts/bench_data.py                         # shapes 4 x 128 (quickstart) and 8 x 2048
    python scripts/bench_data.py --workers 0 2 4 --batches 300 --skip_train

Corpus: this checkout's veomni/*.py sources (real code, what the quickstart trains on) repeated
--repeat times as JSONL documents in 4 shards, tokenized with the quickstart model's tokenizer
(SmolLM2, mask token added as training does). For each micro-batch shape, each loader path and
each worker count, one rank's loader is built (not timed: tokenizing into the cache / packing
happen once, before training), then the first batch (worker start-up) and the next --batches
batches are timed; tokens/s counts real (non-padding) tokens:
  memory     in-memory rows over the token cache (data.streaming=false, the default)
  packed     memory-mapped shards written by scripts/pack_data.py (data.train_path=<packed dir>)
  streaming  JSONL read, tokenized and packed on the fly (data.streaming=true)
  hf-stream  the same files through datasets.load_dataset("json", streaming=True) (hf: source)
workers 0 is the single-process baseline (what the hand-written loader did). Then one training step
of the quickstart model on this machine (SmolLM2-135M, fp32, micro-batch 4 x 128: the quickstart
config; scripts/bench_train.py --child=ours, forward + backward + AdamW) gives the rate the loader
must beat: "x step" = loader tokens/s / training tokens/s.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def write_corpus(out_dir: str, repeat: int, shards: int = 4) -> int:
    files = sorted(glob.glob(os.path.join(REPO, "veomni", "**", "*.py"), recursive=True))
    docs = [open(f, encoding="utf-8").read() for f in files]
    docs = [d for d in docs if d.strip()] * repeat
    handles = [open(os.path.join(out_dir, f"part-{i}.jsonl"), "w") for i in range(shards)]
    for i, d in enumerate(docs):
        handles[i % shards].write(json.dumps({"text": d}) + "\n")
    for h in handles:
        h.close()
    return len(docs)


def _endless(loader):
    while True:  # across epoch ends, as the trainer draws batches
        yield from loader


def time_loader(loader, n: int, step_s: float = 0.0, n_steps: int = 0):
    """Throughput over ``n`` batches; then, with ``step_s``, the stall per step when every batch is
    followed by a ``step_s`` GPU step (a sleep: the CPU is free meanwhile, as when a GPU computes)."""
    it = _endless(loader)
    t0 = time.perf_counter()
    first = next(it)
    t1 = time.perf_counter()
    tokens = 0
    for _ in range(n):
        tokens += int(next(it)["attention_mask"].sum())
    dt = time.perf_counter() - t1
    out = {"first_s": t1 - t0, "batches_s": n / dt, "tokens_s": tokens / dt, "shape": tuple(first["input_ids"].shape),
           "stall_ms": None}
    if step_s and n_steps:
        time.sleep(step_s)  # let the workers refill their prefetch queue
        t2 = time.perf_counter()
        for _ in range(n_steps):
            next(it)
            time.sleep(step_s)
        out["stall_ms"] = 1e3 * ((time.perf_counter() - t2) / n_steps - step_s)
    return out


def train_step_rate(model_path: str) -> float:
    """Tokens/s of one quickstart training step on this machine (median of 3 timed steps)."""
    cmd = [sys.executable, os.path.join(REPO, "scripts", "bench_train.py"), "--child=ours", f"--model_path={model_path}",
           "--batch=4", "--seq=128", "--steps=3", "--device=cpu", "--precision=fp32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    if proc.returncode != 0:
        raise SystemExit(f"training step failed:\n{proc.stderr[-3000:]}")
    step_s = json.loads(proc.stdout.strip().splitlines()[-1])["step_s"]
    return 4 * 128 / step_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batches", type=int, default=200, help="timed batches per configuration")
    p.add_argument("--repeat", type=int, default=8, help="copies of the veomni/ sources in the corpus")
    p.add_argument("--paths", nargs="+", default=["memory", "packed", "streaming", "hf-stream"])
    p.add_argument("--shapes", nargs="+", default=["4x128", "8x2048"], help="micro-batch x max_seq_len")
    p.add_argument("--skip_train", action="store_true", help="do not measure the training step")
    p.add_argument("--gpu_step_s", type=float, default=0.18,
                   help="GPU step time for the 8x2048 shape's stall column: SmolLM2-135M, bf16, H100, 8 x 2048 "
                        "(docs/benchmarks.md, bench_train.py); 0 = skip")
    p.add_argument("--stall_steps", type=int, default=20, help="simulated steps for the stall column")
    args = p.parse_args()

    import torch

    from veomni.data.loader import build_dataloaders
    from veomni.data.readers import ReaderOptions
    from veomni.data.shards import pack
    from veomni.data.sources import FileSource
    from veomni.models.hf_io import load_tokenizer
    from veomni.models.smollm2 import prepare_smollm2

    torch.set_num_threads(1)  # the loader's own cost, not intra-op threads (workers use 1 thread each)
    model_path = str(prepare_smollm2())
    tok = load_tokenizer(model_path)
    if tok.mask_token is None:
        tok.add_special_tokens({"mask_token": "<|mask|>"})
    tmp = tempfile.mkdtemp(prefix="bench_data_")
    corpus = os.path.join(tmp, "corpus")
    os.makedirs(corpus)
    n_docs = write_corpus(corpus, args.repeat)
    rows = []
    for shape in args.shapes:
        mbs, seq = (int(x) for x in shape.split("x"))
        packed = os.path.join(tmp, f"packed-{seq}")
        if "packed" in args.paths:
            t = time.perf_counter()
            man = pack(FileSource(corpus, ReaderOptions()), tok, packed, max_seq_len=seq, progress=False)
            print(f"packed {man['tokens']} tokens ({n_docs} documents) into {len(man['shards'])} shards of {seq}-token "
                  f"rows in {time.perf_counter() - t:.1f} s", flush=True)
        for path in args.paths:
            for w in args.workers:
                kw = dict(micro_batch_size=mbs, max_seq_len=seq, num_workers=w, seed=0,
                          cache_dir=os.path.join(tmp, "cache"))
                src = {"memory": corpus, "packed": packed, "streaming": corpus,
                       "hf-stream": f"hf:json?data_files={corpus}/*.jsonl"}[path]
                if path in ("streaming", "hf-stream"):
                    kw["streaming"] = True
                try:
                    loader = build_dataloaders(src, tok, **kw)[0]
                except ValueError as e:  # e.g. more streams than units
                    print(f"{path} workers={w}: {e}", flush=True)
                    continue
                step = args.gpu_step_s if seq >= 2048 else 0.0
                r = time_loader(loader, args.batches, step, args.stall_steps)
                rows.append(dict(r, path=path, workers=w, mbs=mbs, seq=seq))
                stall = "" if r["stall_ms"] is None else f", stall {r['stall_ms']:.1f} ms per {step:.2f} s step"
                print(f"{path:9s} {mbs}x{seq} workers={w}: {r['batches_s']:.1f} batches/s, {r['tokens_s']:.0f} tok/s, "
                      f"first batch {r['first_s']:.2f} s{stall}", flush=True)
                del loader
    train = None if args.skip_train else train_step_rate(model_path)
    print()
    print(f"corpus: {n_docs} documents (veomni/*.py x {args.repeat}); {args.batches} timed batches per row; "
          f"{os.cpu_count()} CPU cores; torch threads 1 in the main process")
    if train:
        print(f"training step, quickstart model on this machine (SmolLM2-135M fp32, 4 x 128): {train:.0f} tok/s")
    print()
    print(f"stall: main-process time per step spent waiting for data when each batch is followed by a "
          f"{args.gpu_step_s:.2f} s GPU step (8 x 2048 rows only)")
    print()
    head = "| path | workers | micro-batch | batches/s | tokens/s | first batch s | stall ms/step |"
    sep = "|---|---:|---|---:|---:|---:|---:|"
    if train:
        head, sep = head + " x CPU step |", sep + "---:|"
    print(head)
    print(sep)
    for r in rows:
        stall = "" if r["stall_ms"] is None else f"{r['stall_ms']:.1f}"
        line = (f"| {r['path']} | {r['workers']} | {r['mbs']} x {r['seq']} | {r['batches_s']:.1f} | "
                f"{r['tokens_s']:.0f} | {r['first_s']:.2f} | {stall} |")
        if train:  # the measured step is the quickstart's 4 x 128; other shapes get the GPU stall column
            line += f" {r['tokens_s'] / train:.0f}x |" if (r["mbs"], r["seq"]) == (4, 128) else " |"
        print(line)


if __name__ == "__main__":
    main()
