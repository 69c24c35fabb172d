"""Record a teacher's unmasking order for every SFT example: the data of train.objective=d3llm.

    python scripts/precompute_trajectories.py --model TEACHER --data sft_train.jsonl sft_eval.jsonl \
        --out data/traj --max_seq_len 2048 --block_length 32 --batch_size 16
    # then train:  --train.objective=d3llm --data.trajectory_path=data/traj (docs/recipes.md)

The teacher (anything the samplers run: an HF directory, a training checkpoint or run directory, a
.gguf file) decodes the response positions of each example after its prompt, greedily, in blocks of
--block_length, one token per step: the masked position of lowest entropy in the current block
(sampler alg low_entropy, steps = generated length; d3LLM's 'entropy_threshold' with threshold
-inf). For each response token the store keeps the step at which the teacher committed that
position (veomni/diffusion/trajectory.py), not the teacher's tokens: training masks the dataset's
own response in that order (d3LLM's "pseudo-trajectories").

--data is read exactly as training reads it (data.train_path / eval_path: .jsonl / .parquet files,
directories, globs, or a directory written by scripts/pack_data.py), tokenized with the training
tokenizer (--tokenizer, default the teacher's) and truncated at --max_seq_len like training does, so
give the run's data.max_seq_len. Examples are keyed by a hash of their token ids; resumable: a re-run
skips the examples the store already holds (an interrupted run loses at most --flush_every
examples). Several processes can fill one store: --num_shards N --shard_index i (e.g. one per GPU).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the teacher: HF dir, checkpoint, run dir or .gguf")
    p.add_argument("--data", required=True, nargs="+",
                   help="SFT data as data.train_path accepts it; list the eval data too (each path one source)")
    p.add_argument("--out", required=True, help="trajectory store directory (created; re-runs resume)")
    p.add_argument("--tokenizer", default=None,
                   help="the training tokenizer (model.tokenizer_path / model_path); default the teacher's")
    p.add_argument("--mask_token", default="<|mask|>",
                   help="added to the data tokenizer when it has none, as training does (model.mask_token)")
    p.add_argument("--max_seq_len", type=int, default=2048, help="data.max_seq_len of the training run")
    p.add_argument("--block_length", type=int, default=32, help="teacher decoding block (d3LLM: 32)")
    p.add_argument("--gen_length", type=int, default=None,
                   help="positions the teacher decodes after the prompt (d3LLM: 256); default each response "
                        "rounded up to whole blocks. Must hold the longest response.")
    p.add_argument("--batch_size", type=int, default=8, help="examples decoded together (same generated length)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--attn_impl", default="sdpa")
    p.add_argument("--add_mask_token", action="store_true",
                   help="teacher without a mask token (an AR model): add an untrained one (mechanics only)")
    p.add_argument("--skip_bad_lines", action="store_true", help="count and skip malformed records")
    p.add_argument("--num_shards", type=int, default=1, help="split the examples over this many processes")
    p.add_argument("--shard_index", type=int, default=0, help="which split this process decodes")
    p.add_argument("--flush_every", type=int, default=256, help="examples per part file written")
    p.add_argument("--limit", type=int, default=0, help="decode at most this many new examples (0 = all)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _datasets(paths, tok, args):
    """One row dataset per --data path, laid out as training lays it out."""
    from veomni.data.loader import build_dataset
    from veomni.data.shards import PackedShardDataset
    from veomni.data.sources import is_packed_dir

    for path in paths:
        if is_packed_dir(path):
            ds = PackedShardDataset(path, tokenizer=tok, data_type="sft")
            if ds.max_seq_len != args.max_seq_len:
                raise SystemExit(f"{path} was packed with max_seq_len={ds.max_seq_len}; pass --max_seq_len "
                                 f"{ds.max_seq_len} (the training run must use it too)")
            yield path, ds
        else:
            yield path, build_dataset(path, tok, data_type="sft", max_seq_len=args.max_seq_len, packing=False,
                                      skip_bad_lines=args.skip_bad_lines)


def main(argv=None) -> int:
    print(json.dumps(run(build_parser().parse_args(argv))))
    return 0


def run(args) -> dict:
    """Decode what the store lacks; returns the summary main() prints."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not 0 <= args.shard_index < args.num_shards:
        sys.exit(f"--shard_index must be in [0, --num_shards={args.num_shards})")
    if args.block_length < 1 or args.batch_size < 1:
        sys.exit("--block_length and --batch_size must be >= 1")
    from veomni.diffusion.trajectory import TrajectoryWriter, doc_key, gen_length_for, iter_sft_docs, teacher_orders
    from veomni.inference.loading import load_for_inference
    from veomni.models.hf_io import load_tokenizer

    model, teacher_tok = load_for_inference(args.model, dtype=args.dtype, device=args.device,
                                            attn_impl=args.attn_impl, add_mask_token=args.add_mask_token)
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else teacher_tok
    if tok.mask_token is None:  # what ensure_mask_token does at training time (packed dirs check it)
        tok.add_special_tokens({"mask_token": args.mask_token})
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    settings = {"teacher": os.path.abspath(args.model) if os.path.exists(args.model) else args.model,
                "tokenizer": args.tokenizer or "the teacher's", "block_length": args.block_length,
                "gen_length": args.gen_length, "max_seq_len": args.max_seq_len,
                "rule": "low_entropy, one token per step, greedy (d3LLM entropy_threshold, threshold -inf)"}
    writer = TrajectoryWriter(args.out, settings, shard=args.shard_index, flush_every=args.flush_every)
    had = len(writer.done)

    # Pending examples grouped by generated length: a batch decodes rows of one length.
    buckets, seen, index = {}, set(), 0
    for path, ds in _datasets(args.data, tok, args):
        for ids, plen in iter_sft_docs(ds):
            key = doc_key(ids)
            if key in seen:
                continue
            seen.add(key)
            index += 1
            if (index - 1) % args.num_shards != args.shard_index or key in writer.done:
                continue
            if vocab and int(ids.max()) >= vocab:
                sys.exit(f"{path}: token id {int(ids.max())} is outside the teacher's vocabulary ({vocab}): the "
                         "teacher must use the training tokenizer")
            gen = gen_length_for(len(ids) - plen, args.block_length, args.gen_length)
            buckets.setdefault(gen, []).append((key, ids.astype("int32"), plen))
    todo = [(gen, item) for gen in sorted(buckets) for item in buckets[gen]]
    if args.limit:
        todo = todo[:args.limit]
    total_positions = sum(gen for gen, _ in todo)
    logging.info("%d example(s) in --data (shard %d/%d), %d already in %s, %d to decode (%d teacher steps)",
                 index, args.shard_index, args.num_shards, had, args.out, len(todo), total_positions)

    bar = None
    if not args.no_progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=total_positions, desc="teacher", unit="tok", unit_scale=True, dynamic_ncols=True)
    t0, done = time.perf_counter(), 0
    i = 0
    while i < len(todo):
        gen = todo[i][0]
        j = i
        while j < len(todo) and j - i < args.batch_size and todo[j][0] == gen:
            j += 1
        batch = [item for _, item in todo[i:j]]
        orders = teacher_orders(model, [ids[:p].tolist() for _, ids, p in batch], gen, args.block_length)
        for (key, ids, p), order in zip(batch, orders):
            writer.add(key, order[:len(ids) - p], p, gen)
        done += j - i
        if bar is not None:
            bar.update(gen * (j - i))
            bar.set_postfix(examples=f"{done}/{len(todo)}")
        i = j
    writer.flush()
    if bar is not None:
        bar.close()
    return {"examples": index, "decoded": done, "stored": len(writer.done), "out": args.out,
            "seconds": round(time.perf_counter() - t0, 2)}


if __name__ == "__main__":
    sys.exit(main())
