"""Peak memory and time of LM head + cross-entropy, forward + backward, on CPU.

    python scripts/bench_loss_memory.py                  # SmolLM2 head: V=49152, H=576, 8 x 2048 tokens

Variants (every position scored, fp32):
  full     logits = hidden @ W.T; F.cross_entropy(logits, targets, reduction="sum"); backward
  chunked  veomni.ops.chunked_ce.chunked_linear_cross_entropy(..., chunk_size); backward

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
    from veomni.ops.chunked_ce import chunked_linear_cross_entropy
    from veomni.utils.peak_memory import peak_since_mib, reset_peak

    torch.manual_seed(0)
    n = args.batch * args.seq
    hidden = (torch.randn(n, args.hidden) * 0.5).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden) * 0.05).requires_grad_()
    targets = torch.randint(0, args.vocab, (n,))

    # Reset the peak counter so that import and input construction do not count.
    baseline = reset_peak()

    start = time.perf_counter()
    if args.child == "full":
        loss = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    elif args.child == "chunked":
        loss = chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=args.chunk_size)
    else:
        raise ValueError(f"unknown variant {args.child!r}; choose full or chunked")
    loss.backward()
    elapsed = time.perf_counter() - start
    peak_mib = peak_since_mib(baseline)
    print(json.dumps({"variant": args.child, "peak_mib": peak_mib, "time_s": elapsed, "loss": loss.item()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--variants", default="full,chunked", help="comma-separated: full, chunked")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return

    shared = [f"--batch={args.batch}", f"--seq={args.seq}", f"--vocab={args.vocab}",
              f"--hidden={args.hidden}", f"--chunk-size={args.chunk_size}"]
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
    print(f"head + CE fwd+bwd, fp32 CPU, N={args.batch}x{args.seq}={n} tokens, V={args.vocab}, "
          f"H={args.hidden}, chunk_size={args.chunk_size}, torch threads default")
    print(f"full-logits tensor alone: {n * args.vocab * 4 / 2**20:.0f} MiB")
    print(f"| variant | peak MiB | time s | peak / {ref['variant']} | loss |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['variant']} | {r['peak_mib']:.0f} | {r['time_s']:.1f} | "
              f"{r['peak_mib'] / ref['peak_mib']:.3f} | {r['loss']:.2f} |")


if __name__ == "__main__":
    main()
