"""Decoding benchmark: every sampler strategy vs the naive one, on the same prompts.

    python scripts/bench_decode.py --quick                         # 64 new tokens, batch 1 (smoke)
    python scripts/bench_decode.py                                 # 256 new tokens, batch 1 and 8
    python scripts/bench_decode.py --model_path outputs/quickstart/hf --out bench.md
    python scripts/bench_decode.py --new_tokens 128 --batch_sizes 1 --strategies naive,threshold_dual

Model: SmolLM2-135M-Instruct (prepared by veomni.models.smollm2, mask token added in memory,
bidirectional attention) unless --model_path names one. A raw AR model is not a trained dLLM: its
agreement and tokens-per-forward show the mechanics only; measure a trained model for real numbers.

naive = a full forward every step, steps = new tokens (maskgit_plus, greedy). Every strategy runs
greedy on the same prompts. Columns: NFE = model calls; TPF = new tokens per call per row;
tok/s = new tokens (all rows) / wall time; ms/step = wall time / steps; agreement = fraction of
generated positions equal to the naive output. EOS handling is off by default (every row
generates exactly --new_tokens tokens, so rows and strategies do the same amount of work; with
--stop_at_eos the padding after an EOS counts as agreeing).

Before running, one full forward per batch size is timed and the run's cost is bounded (every
strategy counted at its worst case, N full forwards); above --max_minutes the script stops and
says which flags scale it down.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three most important ideas in computer science are",
    "import json\n\ndef load_config(path):\n",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.\n",
    "class Stack:\n    def __init__(self):\n",
    "Explain why the sky is blue in simple terms:",
    "def quicksort(items):\n",
    "Q: What is the capital of France?\nA:",
]


def strategies(n: int, block: int, fast_steps: int) -> Dict[str, dict]:
    """name -> sampler overrides. LLaDA's steps must be a multiple of its block count."""
    n_blocks = math.ceil(n / block)
    llada_steps = n_blocks * max(1, n // n_blocks)
    fast_llada = n_blocks * max(1, fast_steps // n_blocks)
    par = dict(block_length=block)
    return {
        "naive": dict(alg="maskgit_plus", steps=n),
        f"maskgit_plus_{fast_steps}steps": dict(alg="maskgit_plus", steps=fast_steps),
        f"llada_low_confidence_b{block}": dict(alg="low_confidence", block_length=block, steps=llada_steps),
        # A fixed 4 tokens per forward (steps = N/4) with the KV caches: the fast setting whose
        # tokens-per-forward does not depend on how confident the model is.
        f"llada_b{block}_{fast_llada}steps_prefix": dict(alg="low_confidence", block_length=block,
                                                        steps=fast_llada, use_cache="prefix"),
        f"llada_b{block}_{fast_llada}steps_dual": dict(alg="low_confidence", block_length=block,
                                                      steps=fast_llada, use_cache="dual"),
        "threshold0.9": dict(alg="threshold", threshold=0.9, **par),
        "threshold0.9_prefix": dict(alg="threshold", threshold=0.9, use_cache="prefix", **par),
        "threshold0.9_dual": dict(alg="threshold", threshold=0.9, use_cache="dual", **par),
        "factor1.0": dict(alg="factor", factor=1.0, **par),
        "multi_block": dict(alg="multi_block", **par),
        "multi_block_prefix": dict(alg="multi_block", use_cache="prefix", **par),
    }


def worst_case_forwards(overrides: dict, n: int) -> int:
    return overrides.get("steps", n)  # dynamic algs commit >= 1 token per row per forward


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).float().mean())


def load(args):
    from veomni.inference.loading import load_for_inference, model_source
    from veomni.models.hf_io import load_model, load_tokenizer

    if args.model_path:
        try:
            model, tok = load_for_inference(args.model_path, dtype=args.dtype, device=args.device)
            note = f"model: {args.model_path}"
        except ValueError as exc:
            if "has no mask token" not in str(exc):
                raise
            model, tok = load_for_inference(args.model_path, dtype=args.dtype, device=args.device,
                                            add_mask_token=True, log=lambda m: None)
            note = f"model: {args.model_path} (AR: mask token added in memory; mechanics only)"
        return model, tok, note
    from veomni.inference.loading import resolve_device
    from veomni.models.mask_token import ensure_mask_token
    from veomni.models.smollm2 import prepare_smollm2

    path = prepare_smollm2()
    _, path = model_source(path)
    dtype = None if args.dtype == "auto" else args.dtype
    model = load_model(path, dtype=dtype, device=resolve_device(args.device))
    tok = load_tokenizer(path)
    ensure_mask_token(model, tok)
    model.config.dllm_attn_mode = "bidirectional"
    note = ("model: SmolLM2-135M-Instruct, a raw AR model (mask token added in memory, bidirectional "
            "attention): not a trained dLLM, so agreement and TPF reflect the mechanics only")
    return model.eval(), tok, note


def prompt_batch(tok, batch: int, device):
    from veomni.inference.generate import encode_prompts

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    return encode_prompts(tok, prompts, device=device)


def time_full_forward(model, ids, mask, n: int) -> float:
    """Seconds of one full forward over prompt + n positions (after one warm-up call)."""
    x = torch.cat([ids, torch.full((ids.shape[0], n), model.config.mask_token_id, device=ids.device)], 1)
    m = torch.cat([mask, torch.ones_like(x[:, ids.shape[1]:])], 1)
    keep = torch.arange(ids.shape[1] - 1, x.shape[1] - 1, device=ids.device)
    with torch.no_grad():
        for i in range(2):
            if i == 1:
                if ids.is_cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            model(x, attention_mask=m, attn_mode=getattr(model.config, "dllm_attn_mode", None) or "bidirectional",
                  block_size=getattr(model.config, "dllm_block_size", None), logits_to_keep=keep)
        if ids.is_cuda:
            torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_bench(model, tok, n: int, batch_sizes: List[int], block: int, fast_steps: int,
              names: Optional[List[str]], stop_at_eos: bool, max_minutes: float, log) -> List[dict]:
    from veomni.inference.generate import generate

    table = strategies(n, block, fast_steps)
    chosen = list(table) if not names else names
    unknown = [s for s in chosen if s not in table]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; choose from {list(table)}")
    if "naive" not in chosen:
        chosen = ["naive"] + chosen  # the reference for agreement
    batches = {b: prompt_batch(tok, b, model.device) for b in batch_sizes}
    estimate = 0.0
    for b, (ids, mask) in batches.items():
        t_full = time_full_forward(model, ids, mask, n)
        forwards = sum(worst_case_forwards(table[s], n) for s in chosen)
        estimate += t_full * forwards
        log(f"batch {b}: one full forward {t_full * 1e3:.0f} ms; at most {forwards} forwards")
    log(f"estimated upper bound: {estimate / 60:.1f} min")
    if max_minutes > 0 and estimate / 60 > max_minutes:
        raise SystemExit(
            f"estimated up to {estimate / 60:.0f} min > --max_minutes {max_minutes:g} on {model.device}. Scale "
            "down: --quick (64 tokens, batch 1), --new_tokens 64, --batch_sizes 1, --strategies a,b; or "
            "raise --max_minutes (0 = no limit).")
    eos = {} if stop_at_eos else dict(eos_token_id=[])
    rows = []
    for b, (ids, mask) in batches.items():
        generate(model, ids, attention_mask=mask, max_new_tokens=min(n, 8), steps=min(n, 8), **eos)  # warm-up
        naive = None
        for name in chosen:
            out = generate(model, ids, attention_mask=mask, max_new_tokens=n, temperature=0.0, seed=0,
                           **table[name], **eos)
            gen = out.sequences[:, ids.shape[1]:]
            naive = gen if name == "naive" else naive
            st = out.stats
            wall = max(st["wall_time_s"], 1e-9)
            rows.append(dict(batch=b, strategy=name, nfe=st["nfe"], tpf=st["new_tokens"] / st["nfe"] / b,
                             tok_s=st["new_tokens"] / wall, ms_step=1e3 * wall / max(st["steps"], 1),
                             agreement=agreement(gen, naive)))
            log(f"  batch {b} {name}: nfe={st['nfe']} wall={wall:.1f}s")
    return rows


def markdown(rows: List[dict], header: List[str]) -> str:
    lines = [f"> {h}" for h in header] + [
        "",
        "| batch | strategy | NFE | tokens/forward | tok/s | ms/step | agreement w/ naive |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['strategy']} | {r['nfe']} | {r['tpf']:.2f} | {r['tok_s']:.1f} | "
                     f"{r['ms_step']:.1f} | {r['agreement']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default=None, help="HF dir / checkpoint (default: SmolLM2-135M + mask)")
    ap.add_argument("--new_tokens", type=int, default=None, help="tokens generated per row (default 256)")
    ap.add_argument("--batch_sizes", default=None, help="comma list (default 1,8)")
    ap.add_argument("--block_length", type=int, default=32, help="block of the semi-AR strategies")
    ap.add_argument("--fast_steps", type=int, default=None, help="steps of the fast maskgit_plus row (N/4)")
    ap.add_argument("--strategies", default=None, help="comma list of strategy names (default: all)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 64 new tokens, batch 1")
    ap.add_argument("--stop_at_eos", action="store_true", help="let rows stop at EOS (default: off)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--max_minutes", type=float, default=10.0, help="refuse runs estimated longer (0 = no limit)")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    if args.quick and (args.new_tokens is not None or args.batch_sizes is not None):
        ap.error("--quick sets --new_tokens 64 --batch_sizes 1; drop one or the other")
    n = 64 if args.quick else (args.new_tokens or 256)
    batch_sizes = [1] if args.quick else [int(b) for b in (args.batch_sizes or "1,8").split(",")]
    fast_steps = args.fast_steps or max(1, n // 4)
    if n < 1 or fast_steps > n or min(batch_sizes) < 1 or args.block_length < 1:
        ap.error("need new_tokens >= 1, 1 <= fast_steps <= new_tokens, batch sizes >= 1, block_length >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    model, tok, note = load(args)
    names = args.strategies.split(",") if args.strategies else None
    rows = run_bench(model, tok, n, batch_sizes, args.block_length, fast_steps, names, args.stop_at_eos,
                     args.max_minutes, log)
    dev = model.device
    hw = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    header = [note, f"{n} new tokens, greedy, block {args.block_length}, dtype {model.dtype}, {hw}, "
                    f"EOS {'on' if args.stop_at_eos else 'off'}; naive = maskgit_plus, steps = new tokens"]
    table = markdown(rows, header)
    print(table)
    if args.out:
        Path(args.out).write_text(table)
        log(f"wrote {args.out}")
    return table


if __name__ == "__main__":
    main()
