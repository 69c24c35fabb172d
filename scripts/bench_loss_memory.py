"""Peak memory and time of LM head + cross-entropy, forward + backward, on CPU (or one GPU).

    python scripts/bench_loss_memory.py                  # SmolLM2 head: V=49152, H=576, 8 x 2048 tokens
    python scripts/bench_loss_memory.py --device cuda --dtype bf16 --weighted \
        --variants full,chunked,triton,liger             # the model.ops.linear_ce choices (GPU)

Variants (every position scored; --weighted: per-row weights in [1, 1000) as MDM's 1/t):
  full     logits = hidden @ W.T; F.cross_entropy(logits, targets, reduction="none") * w, sum; backward
  chunked  veomni.ops.chunked_ce.chunked_linear_cross_entropy(..., chunk_size); backward
           (= model.ops.linear_ce=eager)
  triton   model.ops.linear_ce=triton: veomni/ops/triton/linear_ce.py (same chunk_size)
  liger    model.ops.linear_ce=liger: liger-kernel's fused linear CE (its own chunking)
The triton / liger rows need a CUDA GPU: on CPU their kernels only run under the Triton interpreter
(TRITON_INTERPRET=1), far too slow at these shapes; scripts/gpu_benchmarks.sh runs them there.
On CUDA the peak is torch.cuda.max_memory_allocated above the inputs.

Each variant runs in a fresh subprocess so one variant's freed-but-cached memory cannot hide in
the other's numbers. Inside the child: build inputs, reset the kernel's peak-RSS counter
(write "5" to /proc/self/clear_refs), record VmRSS as the baseline, run forward + backward, and
report VmHWM - baseline. The number therefore includes everything the loss allocates, the
.grad of hidden and weight included, and excludes the inputs themselves. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def run_child(args) -> None:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from veomni.ops.linear_ce import linear_cross_entropy
    from veomni.ops.registry import require_liger, require_triton
    from veomni.utils.peak_memory import peak_since_mib, reset_peak

    impl = {"chunked": "eager", "triton": "triton", "liger": "liger"}.get(args.child)
    if args.child not in ("full", "chunked", "triton", "liger"):
        raise ValueError(f"unknown variant {args.child!r}; choose full, chunked, triton or liger")
    if impl in ("triton", "liger"):
        (require_triton if impl == "triton" else require_liger)(f"variant {impl}")
    cuda = args.device == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    n = args.batch * args.seq
    hidden = (torch.randn(n, args.hidden, device=args.device) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, device=args.device) * 0.05).to(dtype).requires_grad_()
    targets = torch.randint(0, args.vocab, (n,), device=args.device)
    tw = 1.0 / torch.empty(n, device=args.device).uniform_(1e-3, 1.0) if args.weighted else None

    def step():
        if args.child == "full":
            ce = F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="none")
            loss = (ce if tw is None else ce * tw).sum()
        else:
            loss = linear_cross_entropy(hidden, weight, targets, tw, chunk_size=args.chunk_size, impl=impl)
        loss.backward()
        return loss

    if cuda:  # compile / autotune / allocator warm-up outside the measurement
        step()
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        # Reset the peak counter so that import and input construction do not count.
        baseline = reset_peak()

    start = time.perf_counter()
    loss = step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak_mib = (torch.cuda.max_memory_allocated() - baseline) / 2**20 if cuda else peak_since_mib(baseline)
    print(json.dumps({"variant": args.child, "peak_mib": peak_mib, "time_s": elapsed, "loss": loss.item()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--variants", default="full,chunked", help="comma-separated: full, chunked, triton, liger")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="hidden and head weight dtype")
    parser.add_argument("--weighted", action="store_true", help="per-row weights (MDM's 1/t) instead of none")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return

    shared = [f"--batch={args.batch}", f"--seq={args.seq}", f"--vocab={args.vocab}",
              f"--hidden={args.hidden}", f"--chunk-size={args.chunk_size}", f"--device={args.device}",
              f"--dtype={args.dtype}"] + (["--weighted"] if args.weighted else [])
    results = []
    for variant in args.variants.split(","):
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), f"--child={variant}", *shared],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"variant {variant} failed:\n{proc.stderr}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    ref = next((r for r in results if r["variant"] == "full"), results[0])
    n = args.batch * args.seq
    print(f"head + CE fwd+bwd, {args.dtype} {args.device.upper()}, N={args.batch}x{args.seq}={n} tokens, "
          f"V={args.vocab}, H={args.hidden}, chunk_size={args.chunk_size}, "
          f"{'per-row weights' if args.weighted else 'unweighted'}, torch threads default")
    print(f"full-logits tensor alone: {n * args.vocab * 4 / 2**20:.0f} MiB")
    print(f"| variant | peak MiB | time s | peak / {ref['variant']} | loss |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['variant']} | {r['peak_mib']:.0f} | {r['time_s']:.1f} | "
              f"{r['peak_mib'] / ref['peak_mib']:.3f} | {r['loss']:.2f} |")


if __name__ == "__main__":
    main()
