"""EditFlow alignment cost: ms per x0/x1 pair, the Python reference DP vs the numpy row DP.

    python scripts/bench_editflow_align.py                 # x1 = 512 tokens of this checkout's source
    python scripts/bench_editflow_align.py --length 1024 --reps 5

x1: --length tokens of real code (veomni/*.py, tokenized with the quickstart model's tokenizer, SmolLM2),
one window per repetition. x0 per case:
  masks:64 / masks:128   the training case: x0 = N mask tokens (train.editflow.x0_sampler)
  empty                  x0 = nothing (the DP is skipped: all insertions)
  10% edited x1          x0 = x1 with 10% of the tokens substituted, deleted or inserted
  unrelated text         x0 = another --length-token window
Both implementations run on the same pairs and their alignments are checked equal. One core, after a
warm-up call; the time per pair is the median over --reps pairs.
"""
from __future__ import annotations

import argparse
import glob
import os
import random
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def corpus_ids(length: int, count: int):
    from veomni.models.embedded import resolve_model_path
    from veomni.models.hf_io import load_tokenizer

    tok = load_tokenizer(resolve_model_path("embedded:smollm2-135m-instruct"))
    text = "".join(open(f, encoding="utf-8").read() for f in sorted(glob.glob(f"{REPO}/veomni/**/*.py", recursive=True)))
    ids = tok(text[:length * count * 8], add_special_tokens=False).input_ids
    if len(ids) < length * (count + 1):
        raise SystemExit(f"corpus too short for {count + 1} windows of {length} tokens")
    return [ids[i * length:(i + 1) * length] for i in range(count + 1)], tok.vocab_size


def edited(x, rate: float, vocab: int, rng: random.Random):
    out = []
    for t in x:
        r = rng.random()
        if r < rate / 3:
            continue  # delete
        out.append(rng.randrange(vocab) if r < 2 * rate / 3 else t)  # substitute
        if r > 1 - rate / 3:
            out.append(rng.randrange(vocab))  # insert
    return out


def timed(fn, pairs):
    times, results = [], []
    for x0, x1 in pairs:
        start = time.perf_counter()
        results.append(fn(x0, x1))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=512, help="x1 tokens")
    parser.add_argument("--reps", type=int, default=5, help="pairs per case")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from veomni.diffusion.editflow.align import align, align_reference

    windows, vocab = corpus_ids(args.length, args.reps)
    rng = random.Random(0)
    mask = vocab  # any id outside the text
    cases = {
        "masks:64": lambda x1, i: [mask] * 64,
        "masks:128": lambda x1, i: [mask] * 128,
        "empty": lambda x1, i: [],
        "10% edited x1": lambda x1, i: edited(x1, 0.1, vocab, rng),
        "unrelated text": lambda x1, i: windows[i + 1],
    }
    align(windows[0][:64], windows[1][:64])  # warm-up (numpy import paths)
    print(f"x1 = {args.length} tokens, median of {args.reps} pairs, 1 thread")
    print("| x0 | x0 tokens | reference (Python DP) ms | numpy row DP ms | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for name, make in cases.items():
        pairs = [(make(windows[i], i), windows[i]) for i in range(args.reps)]
        ref_ms, ref = timed(align_reference, pairs)
        new_ms, new = timed(align, pairs)
        if ref != new:
            raise SystemExit(f"{name}: the numpy alignment differs from the reference")
        n0 = statistics.median(len(p[0]) for p in pairs)
        print(f"| {name} | {n0:.0f} | {ref_ms:.1f} | {new_ms:.2f} | {ref_ms / max(new_ms, 1e-9):.0f}x |")


if __name__ == "__main__":
    main()
