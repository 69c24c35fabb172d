"""MoE block throughput: the reference expert loop vs the grouped path, side by side.

    python scripts/bench_moe.py                         # CPU fp32 (and CUDA bf16 too when there is a GPU)
    python scripts/bench_moe.py --tokens 2048 --iters 3 --shapes e8k2,e64k8
    python scripts/bench_moe.py --device cuda --tokens 16384 --hidden 2048

One `SparseMoeBlock` (router + fused experts, veomni/models/transformers/moe.py) per shape, built
once; the same weights and the same input batch go through `model.ops.moe_experts=loop` and
`=grouped` (the op switch, veomni/ops/registry.py), so only the expert kernel differs. Each timed
iteration is forward + backward of sum(out^2) (gradients of the input, the router and the experts).
tok/s = tokens / median iteration time after one warm-up iteration. `max abs diff` is the largest
difference between the two outputs (a correctness check on the benchmarked inputs, not a test).

Shapes (name = e<experts>k<top-k>): hidden size and expert width are small so the CPU runs them in
about a minute; the routing is the block's own random-init router (close to uniform load).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # name: (experts, top_k, expert intermediate size)
    "e8k2": (8, 2, 512),
    "e64k8": (64, 8, 128),
    "e128k8": (128, 8, 64),
}


def build_block(experts: int, top_k: int, inter: int, hidden: int, device, dtype, seed: int = 0):
    from transformers import Qwen3MoeConfig

    from veomni.models.transformers.dense_decoder import activation
    from veomni.models.transformers.moe import SparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                         num_experts_per_tok=top_k, norm_topk_prob=True)
    torch.manual_seed(seed)
    block = SparseMoeBlock(cfg, activation(cfg))
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    return block.to(device=device, dtype=dtype)


def time_impl(block, x, impl: str, iters: int, device) -> tuple[float, torch.Tensor]:
    from veomni.ops.registry import apply_ops

    apply_ops(block, {"moe_experts": impl})

    def once():
        block.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        out, _ = block(xi)
        out.float().pow(2).sum().backward()
        return out.detach()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    out = once()  # warm-up (allocator, kernels)
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        once()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def run(device: torch.device, dtype: torch.dtype, args) -> list[dict]:
    rows = []
    for name in args.shapes.split(","):
        experts, top_k, inter = SHAPES[name]
        block = build_block(experts, top_k, inter, args.hidden, device, dtype)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, args.tokens, args.hidden, generator=g).to(device=device, dtype=dtype)
        t_loop, out_loop = time_impl(block, x, "loop", args.iters, device)
        t_grouped, out_grouped = time_impl(block, x, "grouped", args.iters, device)
        rows.append({
            "device": f"{device.type} {str(dtype).replace('torch.', '')}", "shape": name, "E": experts, "k": top_k,
            "H": args.hidden, "I": inter, "tokens": args.tokens,
            "loop tok/s": args.tokens / t_loop, "grouped tok/s": args.tokens / t_grouped,
            "grouped / loop": t_loop / t_grouped,
            "max abs diff": float((out_loop.float() - out_grouped.float()).abs().max()),
        })
        print(f"  {rows[-1]['device']} {name}: loop {t_loop * 1e3:.1f} ms, grouped {t_grouped * 1e3:.1f} ms",
              file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
    for r in rows:
        cells = []
        for h in header:
            v = r[h]
            if h == "grouped / loop":
                cells.append(f"**{v:.2f}x**")
            elif h == "max abs diff":
                cells.append(f"{v:.1e}")
            elif isinstance(v, float):
                cells.append(f"{v:,.0f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per forward (one batch)")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size")
    ap.add_argument("--iters", type=int, default=5, help="timed iterations per implementation (median)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {list(SHAPES)}")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto = CPU fp32, plus CUDA bf16 when a GPU is present")
    args = ap.parse_args()
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
    targets = []
    if args.device in ("auto", "cpu"):
        targets.append((torch.device("cpu"), torch.float32))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        targets.append((torch.device("cuda"), torch.bfloat16))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", file=sys.stderr)
    rows = []
    for device, dtype in targets:
        rows += run(device, dtype, args)
    print(markdown(rows))


if __name__ == "__main__":
    main()
