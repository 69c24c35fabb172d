"""Decode forward latency, eager vs compiled (infer.compile=true), side by side in one run.

    python scripts/bench_decode_compile.py                              # SmolLM2-135M, CPU, batch 1
    python scripts/bench_decode_compile.py --device cuda --dtype bfloat16 --batch_sizes 1,8

The three forwards a sampler makes, each timed as ms per forward (median of --repeats after
--warmup calls, which include compilation; the eager and compiled calls alternate, so a drift of
the machine's speed during the run slows both alike):
  full   no cache: the whole canvas [B, prompt + new] (MDM samplers without a cache, every step);
  block  dual cache: one decode block of --block_length queries against the cached row;
  e2e    a whole generation (alg threshold 0.9, dual cache, block --block_length): ms per forward =
         wall time / NFE, and whether compiled decoding gave the same tokens as eager.
compiled = veomni.inference.compiled.compile_for_decoding: CUDA graphs (mode reduce-overhead) on
CUDA, inductor's default mode on CPU. The model is SmolLM2-135M with a mask token added in memory
(mechanics only: the tokens are not meaningful), or --model_path.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed_in_turns(fns: dict, dev, warmup: int, repeats: int) -> dict:
    """ms per call (median) of each of `fns`, the calls alternating (a, b, a, b, ...) so that a
    machine whose speed drifts during the run (a shared CPU) slows each of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def forward_calls(model, bsz: int, prompt: int, new: int, block: int) -> dict:
    """The two forwards a sampler makes, as closures over this model's own inputs and cache: the full
    canvas, and one block against a filled dual cache (call `refresh` once before timing `block`)."""
    from veomni.diffusion.sampling.cache import WindowedKVCache

    dev, cfg = model.device, model.config
    total = prompt + new
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.mask_token_id, (bsz, total), generator=g).to(dev)
    x[:, prompt:] = cfg.mask_token_id
    pos = torch.arange(total, device=dev).expand(bsz, -1)
    valid = torch.ones(bsz, total, dtype=torch.bool, device=dev)
    kw = dict(attn_mode="bidirectional")

    def full():
        model(x, position_ids=pos, logits_to_keep=torch.arange(prompt - 1, total - 1, device=dev), **kw)

    cache = WindowedKVCache(total)
    q0 = prompt  # the first generated block

    def refresh():
        cache.begin(0, total, None, None)
        model(x, position_ids=pos, past_key_values=cache, attention_mask=valid,
              cache_position=torch.arange(total, device=dev), logits_to_keep=torch.arange(1, device=dev), **kw)

    def step():
        cache.begin(q0 - 1, q0 + block - 1, None, None)
        model(x[:, q0 - 1:q0 + block - 1], position_ids=pos[:, q0 - 1:q0 + block - 1], past_key_values=cache,
              attention_mask=valid, cache_position=torch.arange(q0 - 1, q0 + block - 1, device=dev),
              logits_to_keep=torch.arange(block, device=dev), **kw)

    return {"full": full, "refresh": refresh, "block": step}


def forwards(models: dict, bsz: int, prompt: int, new: int, block: int, warmup: int, repeats: int) -> dict:
    """{kind: {model name: ms per forward}} for kind in (full, block), the models taking turns."""
    calls = {name: forward_calls(m, bsz, prompt, new, block) for name, m in models.items()}
    out = {}
    with torch.no_grad():
        out["full"] = _timed_in_turns({n: c["full"] for n, c in calls.items()}, dev=_device(models), warmup=warmup,
                                      repeats=repeats)
        for c in calls.values():
            c["refresh"]()
        out["block"] = _timed_in_turns({n: c["block"] for n, c in calls.items()}, dev=_device(models),
                                       warmup=warmup, repeats=repeats)
    return out


def _device(models: dict):
    return next(iter(models.values())).device


def e2e(model, bsz: int, prompt: int, new: int, block: int):
    from veomni.inference.generate import generate

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.mask_token_id, (bsz, prompt), generator=g).to(model.device)
    _sync(model.device)
    t0 = time.perf_counter()
    out = generate(model, ids, max_new_tokens=new, alg="threshold", threshold=0.9, block_length=block,
                   use_cache="dual", eos_token_id=[], temperature=0.0)
    _sync(model.device)
    return out.sequences, (time.perf_counter() - t0) * 1e3 / out.stats["nfe"], out.stats["nfe"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch_sizes", default="1")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--block_length", type=int, default=32)
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per shape (compilation happens here)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--no_e2e", action="store_true", help="skip the whole-generation row")
    args = p.parse_args()

    from veomni.inference.compiled import compile_for_decoding
    from veomni.models.hf_io import load_model, load_tokenizer
    from veomni.models.mask_token import ensure_mask_token

    if args.model_path is None:
        from veomni.inference.loading import model_source
        from veomni.models.smollm2 import prepare_smollm2

        _, args.model_path = model_source(prepare_smollm2())
    dtype = getattr(torch, args.dtype)
    eager = load_model(args.model_path, dtype=dtype, device=torch.device(args.device)).eval()
    ensure_mask_token(eager, load_tokenizer(args.model_path))
    eager.config.dllm_attn_mode = "bidirectional"
    compiled = compile_for_decoding(copy.deepcopy(eager))
    dev = eager.device
    hw = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"decode forward latency, {os.path.basename(str(args.model_path).rstrip('/'))}, {args.dtype}, {hw}, "
          f"prompt {args.prompt} + {args.new_tokens} new, block {args.block_length}, median of {args.repeats} "
          f"after {args.warmup} warm-up calls; load average {load:.1f} at the start")
    print("| batch | forward | eager ms | compiled ms | speed-up | same tokens |")
    print("|---:|---|---:|---:|---:|---|")
    for bsz in (int(b) for b in args.batch_sizes.split(",")):
        res = forwards({"eager": eager, "compiled": compiled}, bsz, args.prompt, args.new_tokens, args.block_length,
                       args.warmup, args.repeats)
        for kind in ("full", "block"):
            e, c = res[kind]["eager"], res[kind]["compiled"]
            print(f"| {bsz} | {kind} | {e:.1f} | {c:.1f} | {e / c:.2f}x | |")
        if not args.no_e2e:
            e2e(compiled, bsz, args.prompt, args.new_tokens, args.block_length)  # compile every shape first
            seq_e, ms_e, nfe = e2e(eager, bsz, args.prompt, args.new_tokens, args.block_length)
            seq_c, ms_c, _ = e2e(compiled, bsz, args.prompt, args.new_tokens, args.block_length)
            print(f"| {bsz} | e2e ({nfe} forwards) | {ms_e:.1f} | {ms_c:.1f} | {ms_e / ms_c:.2f}x | "
                  f"{'yes' if torch.equal(seq_e, seq_c) else 'no'} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
