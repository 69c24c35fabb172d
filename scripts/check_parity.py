#!/usr/bin/env python
"""Compare our model's causal logits with Hugging Face transformers' on the same checkpoint.

    python scripts/check_parity.py --model_path DIR [--gguf_file F] [--attn_impl sdpa|eager|flex]
        [--dtype float32] [--batch 2] [--seq_len 32] [--seed 0] [--tol 1e-4]

Both load DIR (ours through veomni.models.load_model, HF through AutoModelForCausalLM with the same
attention kernel where HF has it: sdpa vs sdpa, eager vs eager; flex vs HF eager). One random batch, where every other row is right-padded, runs through
both in causal mode with an attention mask; only real (non-padding) positions are compared.
The LAST line printed is `max_abs_diff=<x>`; the exit code is 1 when x > --tol. 1e-4 is meant for
float32: raise --tol for bf16/fp16.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

from veomni.models.hf_io import load_model, resolve_dtype  # noqa: E402


def make_batch(vocab_size: int, batch: int, seq_len: int, seed: int):
    """Random ids; odd rows right-padded to ~2/3 of seq_len (pad id 0 under mask 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=g)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    for row in range(1, batch, 2):
        real = max(1, (2 * seq_len) // 3 - row)
        mask[row, real:] = 0
        ids[row, real:] = 0
    return ids, mask


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", required=True, help="HF model directory (or the folder of --gguf_file)")
    p.add_argument("--gguf_file", default=None, help="GGUF file name inside --model_path")
    p.add_argument("--attn_impl", default="sdpa", choices=["sdpa", "eager", "flex"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4)
    args = p.parse_args(argv)
    if args.batch < 1 or args.seq_len < 2:
        p.error("--batch must be >= 1 and --seq_len >= 2")

    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(args.dtype)
    extra = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    ours = load_model(args.model_path, dtype=dtype, attn_impl=args.attn_impl, **extra)
    # Like against like: our sdpa vs HF sdpa (same kernel), eager vs eager; flex has no HF twin on
    # CPU, so it is checked against HF eager. Different kernels differ by ~1e-4 on logits of ~35.
    ref_impl = {"sdpa": "sdpa", "eager": "eager", "flex": "eager"}[args.attn_impl]
    ref = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype, attn_implementation=ref_impl,
                                               **extra).eval()
    ids, mask = make_batch(ours.config.vocab_size, args.batch, args.seq_len, args.seed)
    with torch.no_grad():
        ours_logits = ours(input_ids=ids, attention_mask=mask, attn_mode="causal").logits.float()
        ref_logits = ref(input_ids=ids, attention_mask=mask).logits.float()
    real = mask.bool()
    diff = (ours_logits[real] - ref_logits[real]).abs()
    argmax_agree = (ours_logits[real].argmax(-1) == ref_logits[real].argmax(-1)).float().mean().item()
    print(f"model={args.model_path} type={ours.config.model_type} params={ours.num_parameters():,}")
    print(f"dtype={dtype} attn_impl={args.attn_impl} (reference: transformers {ref_impl}) "
          f"batch={args.batch} seq_len={args.seq_len} real_tokens={int(real.sum())}")
    print(f"mean_abs_diff={diff.mean().item():.3e} argmax_agreement={argmax_agree:.4f} tol={args.tol:g}")
    max_diff = diff.max().item()
    print(f"max_abs_diff={max_diff:.6e}")
    return 0 if max_diff <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
