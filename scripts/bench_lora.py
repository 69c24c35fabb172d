"""Full fine-tuning vs LoRA vs QLoRA through the trainer, side by side (one process per variant).

    python3 scripts/bench_lora.py                        # SmolLM2-135M, 4 x 128 tokens, 6 steps, CPU
    python3 scripts/bench_lora.py --steps 10 --seq 256 --variants full lora qlora
    python3 scripts/bench_lora.py --model_path DIR --device-note "H100"   # on a GPU machine: same script

Every variant builds the trainer exactly as tasks/train_torch.py does (configs/quickstart/
smollm2_mdm.yaml, this checkout's veomni/ sources as data, data_parallel=none, fp32) and trains
--steps optimizer steps, checkpointing at the end:
  full   every parameter trains (the quickstart recipe, lr 5e-5);
  lora   rank-16 adapters on q,k,v,o,gate,up,down + the mask-token row, the base frozen (lr 5e-4);
  qlora  the same adapters on an NF4 base (model.quantize=nf4).
Reported per variant: trainable parameters; bytes of the model's state (packed NF4 + scales for
qlora); AdamW state bytes; the checkpoint directory's size; peak RSS over training (VmHWM above the
built trainer, Linux); median tokens/s of steps 2..N; the last loss.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Each variant at its recipe's learning rate (configs/quickstart/smollm2_mdm.yaml, smollm2_lora_mdm.yaml).
VARIANTS = {
    "full": ["--train.lr=5e-5"],
    "lora": ["--model.lora_rank=16", "--model.lora_alpha=32", "--train.lr=5e-4"],
    "qlora": ["--model.lora_rank=16", "--model.lora_alpha=32", "--model.quantize=nf4", "--train.lr=5e-4"],
}


def _run(variant, args, out_dir, queue):
    import torch

    from veomni.config.parser import parse_args
    from veomni.trainer.trainer import Trainer
    from veomni.utils.peak_memory import peak_since_mib, reset_peak

    torch.set_num_threads(args.threads)
    run = Path(out_dir) / variant
    argv = [str(REPO / "configs/quickstart/smollm2_mdm.yaml"), f"--model.model_path={args.model_path}",
            f"--data.train_path={REPO / 'veomni'}", f"--train.output_dir={run}", f"--data.max_seq_len={args.seq}",
            f"--train.micro_batch_size={args.batch}", f"--train.global_batch_size={args.batch}",
            f"--train.max_steps={args.steps}", "--train.save_steps=0", "--train.eval_steps=0",
            "--train.export_hf=false", "--train.progress_bar=false", "--train.warmup_steps=0",
            "--data.eval_split_ratio=0", f"--data.cache_dir={Path(out_dir) / 'cache'}", *VARIANTS[variant]]
    trainer = Trainer(parse_args(argv=argv))
    try:
        model = trainer.model
        tensors = {(t.data_ptr(), t.numel()): t for t in model.state_dict().values()}  # a tied head once
        state_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        base = reset_peak()
        trainer.train()
        peak = peak_since_mib(base)
        opt_bytes = sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values()
                        for t in s.values() if torch.is_tensor(t))
    finally:
        trainer.close()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ckpt = next((run / "checkpoints").iterdir())
    queue.put({"variant": variant, "trainable": trainable, "state_mb": state_bytes / 2**20,
               "adam_mb": opt_bytes / 2**20, "ckpt_mb": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 2**20,
               "peak_mb": peak, "tok_s": statistics.median(r["tokens_per_s"] for r in rows[1:]) if len(rows) > 1 else None,
               "loss": rows[-1]["loss"]})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:  # one at a time, each in a fresh process (its own peak RSS)
            queue = ctx.Queue()
            proc = ctx.Process(target=_run, args=(variant, args, tmp, queue))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                raise SystemExit(f"variant {variant} failed (exit {proc.exitcode})")
            results.append(queue.get())
    print(f"\n{args.model_path}, batch {args.batch} x {args.seq} tokens, {args.steps} steps, fp32, "
          f"{args.threads} threads, data_parallel=none")
    head = f"{'variant':8} {'trainable':>12} {'state MB':>9} {'Adam MB':>8} {'ckpt MB':>8} {'peak RSS MB':>11} " \
           f"{'tok/s':>7} {'last loss':>9}"
    print(head)
    print("-" * len(head))
    for r in results:
        tok = f"{r['tok_s']:.0f}" if r["tok_s"] is not None else "n/a"
        print(f"{r['variant']:8} {r['trainable']:>12,} {r['state_mb']:>9.1f} {r['adam_mb']:>8.1f} {r['ckpt_mb']:>8.1f} "
              f"{r['peak_mb']:>11.0f} {tok:>7} {r['loss']:>9.4f}")
    return results


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
