"""Run the frozen AR teacher of Repr-Align once over the training rows and store its hidden states
(an anchor cache), so training reads them instead of running the teacher every step.

    python scripts/precompute_anchors.py configs/quickstart/smollm2_mdm.yaml --out anchors/ \
        --layers 4,8,12,-1 --dtype bfloat16 [--teacher PATH] [--batch_size 8] [--train.x=y ...]
    # then train with:  --train.repr_align_weight=10 --train.align_layers=[4,8,12,-1] \
    #                   --train.align_cache_dir=anchors/

The rows are built from the training config exactly as the trainer builds them (same data, tokenizer
with its mask token, max_seq_len, packing, eval split), and each row's states are stored under the
sha256 of its ids and document layout (veomni/diffusion/repr_align.py: row_key), so the trainer finds
them whatever order, world size or micro-batch size it runs with. <out>/manifest.json records the
teacher (path and fingerprint), the layers, max_seq_len and the dtype; training refuses a cache that
does not match its run.

Resumable: rows already stored are skipped, each row is written atomically, and re-running a finished
cache does nothing. A cache built for another teacher, layer set or row length is an error (use
another --out, or --overwrite). Storage per row: len(layers) x max_seq_len x hidden_size x dtype bytes
(SmolLM2-135M, 4 layers of 2048 tokens in bfloat16: 9 MiB). float32 makes the cached loss equal the
live one exactly; bfloat16 halves the size and rounds the targets.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="the training config (YAML); --group.key=value overrides may follow")
    p.add_argument("--out", required=True, help="cache directory (created)")
    p.add_argument("--layers", default="",
                   help="comma-separated hidden-state indices (0 = embeddings, -1 = final normed output); "
                        "empty = train.align_layers of the config, or all")
    p.add_argument("--teacher", default=None, help="teacher model; default train.align_teacher_path or model.model_path")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="storage dtype of the hidden states")
    p.add_argument("--batch_size", type=int, default=8, help="rows per teacher forward")
    p.add_argument("--overwrite", action="store_true", help="discard what --out holds and start again")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _rows(args):
    """The training rows as the trainer builds them (one process)."""
    from veomni.data.loader import build_dataloaders
    from veomni.models.embedded import resolve_model_path
    from veomni.models.hf_io import load_tokenizer
    from veomni.trainer.trainer import checkout_path

    path = checkout_path(resolve_model_path(args.model.require_model_path()))
    tokenizer = load_tokenizer(checkout_path(args.model.tokenizer_path) or path)
    if tokenizer.mask_token is None:  # as the trainer does (ensure_mask_token): the same token ids
        tokenizer.add_special_tokens({"mask_token": args.model.mask_token})
    d = args.data
    if d.streaming:
        raise SystemExit("precompute_anchors: data.streaming has no fixed set of rows; pack the corpus with "
                         "scripts/pack_data.py and train on the packed shards")
    loader, _ = build_dataloaders(
        d.train_path or None, tokenizer, micro_batch_size=1, data_type=d.data_type, max_seq_len=d.max_seq_len,
        packing=d.packing, cache_dir=d.cache_dir or os.path.join(args.train.output_dir, "data_cache"),
        text_key=d.text_key, skip_bad_lines=d.skip_bad_lines, seed=args.train.seed, eval_path=d.eval_path,
        eval_split_ratio=d.eval_split_ratio, sources=d.sources, mixture_weights=d.mixture_weights)
    return loader.dataset


def main(argv=None) -> int:
    ours, rest = build_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from veomni.arguments import parse_args
    from veomni.data.packing import collate
    from veomni.diffusion.repr_align import AnchorCache, model_fingerprint, resolve_layers, row_key, teacher_hidden_states
    from veomni.models.hf_io import load_model

    args = parse_args(argv=[ours.config, *rest])
    teacher_path = ours.teacher or args.train.align_teacher_path or args.model.require_model_path()
    teacher = load_model(teacher_path, dtype=args.model.dtype, attn_impl=args.model.attn_impl).eval()
    n_states = teacher.config.num_hidden_layers + 1
    requested = [int(x) for x in ours.layers.split(",") if x.strip()] if ours.layers else list(args.train.align_layers)
    layers = resolve_layers(requested, n_states)
    manifest = {"model": str(teacher_path), "model_fingerprint": model_fingerprint(teacher_path), "layers": layers,
                "num_hidden_states": n_states, "max_seq_len": args.data.max_seq_len, "dtype": ours.dtype,
                "hidden_size": teacher.config.hidden_size}
    out = ours.out
    mpath = os.path.join(out, "manifest.json")
    if ours.overwrite and os.path.isdir(out):
        shutil.rmtree(out)
    if os.path.isfile(mpath):
        old = json.load(open(mpath))
        if old != manifest:
            diff = sorted(k for k in manifest if old.get(k) != manifest[k])
            raise SystemExit(f"precompute_anchors: {out} holds a cache with other settings ({diff}); use another "
                             "--out or --overwrite")
    else:
        os.makedirs(out, exist_ok=True)
        with open(mpath + ".tmp", "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(mpath + ".tmp", mpath)

    rows = _rows(args)
    todo, seen = [], set()
    for i in range(len(rows)):
        row = rows[i]
        key = row_key(row["input_ids"], row["segment_ids"])
        if key not in seen and not os.path.isfile(os.path.join(out, key[:2], f"{key}.pt")):
            todo.append((key, i))
        seen.add(key)  # identical rows share one entry
    done = len(seen) - len(todo)
    logging.info("anchor cache %s: %d distinct rows, %d already stored, %d to compute (layers %s, %s)", out, len(seen), done,
                 len(todo), layers, ours.dtype)
    dtype = getattr(torch, ours.dtype)
    bar = None
    if not ours.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="anchors", unit="row", dynamic_ncols=True)
    t0, tokens = time.perf_counter(), 0
    for start in range(0, len(todo), ours.batch_size):
        chunk = todo[start:start + ours.batch_size]
        batch = collate([rows[i] for _, i in chunk])
        hs = teacher_hidden_states(teacher, batch)
        for b, (key, _) in enumerate(chunk):
            AnchorCache.write(out, key, {i: hs[i][b].to(dtype) for i in layers})
        tokens += int(batch["attention_mask"].sum())
        if bar is not None:
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
    if bar is not None:
        bar.close()
    logging.info("anchor cache %s complete: %d rows", out, len(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
