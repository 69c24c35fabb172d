"""Expert compute of a mixture-of-experts block: the reference loop and the grouped path.

Weights use the fused layout (the one transformers v5 keeps in memory):
    gate_up [E, 2I, H]  (gate rows first, then up rows)     down [E, H, I]
and expert e computes  down[e] @ (act(gate) * up),  [gate; up] = gate_up[e] @ x.

Two implementations, chosen by one switch (`model.ops.moe_experts`, see veomni/ops/registry.py):

  loop     the reference: for each expert, gather its tokens, run its SwiGLU, add the weighted
           result back. Token order inside an expert follows transformers' Qwen3MoeExperts
           (top-k slot first, then token), so the sums round the same way.
  grouped  sort the (token, slot) pairs by expert once, run all experts as two grouped matmuls
           (`torch._grouped_mm`, one kernel each), weight, and scatter back. No per-expert Python
           work and no host sync per expert.

`expert_ffn(x_sorted, counts, ...)` is the piece expert parallelism reuses: tokens already sorted
by (local) expert, `counts[e]` rows per expert, the result in the same order.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from veomni.ops.swiglu import gated_act

EXPERT_IMPLS = ("loop", "grouped")


def check_experts_impl(impl: str) -> str:
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"model.ops.moe_experts={impl!r} is not one of {EXPERT_IMPLS} "
                         "(loop: the reference; grouped: sorted tokens + grouped matmuls)")
    return impl


@torch.library.custom_op("veomni::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm as an opaque op with its own backward (CPU and non-bf16 path).

    torch._grouped_mm has no CPU backward (it fails with "Invalid strides/sizes"), so both
    gradients are written as grouped matmuls themselves: dx = g @ b[g]^T, db[g] = x_g^T @ g_g.
    A custom op rather than an autograd.Function because the fake (meta) kernel of _grouped_mm
    accepts bf16 only: torch.compile of an fp32 MoE layer failed with "Expected inputs of BF16
    type"; this op's fake kernel below states the output shape for any dtype."""
    return torch._grouped_mm(x, b, offs=offs)


@_grouped_mm_op.register_fake
def _(x, b, offs):
    if b.dim() == 3:  # [N, K] x [G, K, M] -> [N, M]
        return x.new_empty(x.shape[0], b.shape[-1])
    return x.new_empty(offs.shape[0], x.shape[0], b.shape[-1])  # [K, N] x [N, M] -> [G, K, M]


def _grouped_mm_setup(ctx, inputs, output):
    x, b, offs = inputs
    ctx.save_for_backward(x, b, offs)


def _grouped_mm_backward(ctx, grad):
    x, b, offs = ctx.saved_tensors
    grad = grad.contiguous()
    dx = _grouped_mm_op(grad, b.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    db = _grouped_mm_op(x.t(), grad, offs) if ctx.needs_input_grad[1] else None
    return dx, db, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def _aligned(n: int, element_size: int) -> int:
    step = max(1, 16 // element_size)
    return -(-n // step) * step


def grouped_mm(x: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [N, K] sorted by group, b [G, K, M], counts [G] rows per group -> [N, M]."""
    offs = torch.cumsum(counts, 0).to(device=x.device, dtype=torch.int32)
    # torch._grouped_mm wants 16-byte row strides ("strides should be multiple of 16 bytes" for,
    # e.g., fp32 moe_intermediate_size=19): zero-pad K and M up to the next multiple, which leaves
    # the product exact, and cut the padding off the result.
    k, m = b.shape[-2], b.shape[-1]
    kp, mp = _aligned(k, x.element_size()), _aligned(m, x.element_size())
    if kp != k:
        x, b = F.pad(x, (0, kp - k)), F.pad(b, (0, 0, 0, kp - k))
    if mp != m:
        b = F.pad(b, (0, mp - m))
    try:
        if x.is_cuda:  # CUDA has a native backward for _grouped_mm
            y = torch._grouped_mm(x, b, offs=offs)
        else:
            y = _grouped_mm_op(x, b, offs)
        return y if mp == m else y[:, :m]
    except RuntimeError as exc:
        raise RuntimeError(
            f"model.ops.moe_experts=grouped: torch._grouped_mm failed for {x.dtype} on {x.device} ({exc}). "
            "Use a dtype/device it supports (bf16 on Hopper; any float on CPU) or set "
            "--model.ops.moe_experts=loop.") from exc


def _swiglu(h: torch.Tensor, act: Callable, act_impl: str = "eager") -> torch.Tensor:
    # act_impl is model.ops.swiglu: the halves are strided views, which the fused kernels read in place.
    gate, up = h.chunk(2, dim=-1)
    return gated_act(gate, up, act, act_impl)


def expert_ffn(x_sorted: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
               act: Callable, impl: str, act_impl: str = "eager") -> torch.Tensor:
    """SwiGLU of every expert over its contiguous rows of `x_sorted` ([N, H] -> [N, H]).
    impl: model.ops.moe_experts ('grouped' | 'loop'); act_impl: model.ops.swiglu."""
    if x_sorted.shape[0] == 0:
        # An expert-parallel rank can receive no token. Still connect the input and the weights to
        # the output, so backward gives them (zero) gradients and every rank joins the same
        # gradient collectives; a missing grad would leave FSDP's reduce-scatter waiting.
        return x_sorted * 0.0 + 0.0 * (gate_up.sum() + down.sum())
    if impl == "grouped":
        h = grouped_mm(x_sorted, gate_up.transpose(-2, -1), counts)
        return grouped_mm(_swiglu(h, act, act_impl), down.transpose(-2, -1), counts)
    outs = []
    for e, rows in enumerate(x_sorted.split(counts.tolist())):
        if rows.shape[0]:
            outs.append(F.linear(_swiglu(F.linear(rows, gate_up[e]), act, act_impl), down[e]))
    return torch.cat(outs)


def sort_by_expert(top_idx: torch.Tensor, num_experts: int):
    """(token index of each sorted pair, the pair order, rows per expert) for top_idx [T, k]."""
    flat = top_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # Not torch.bincount: its output length is max(id) + 1 when that exceeds minlength, a
    # data-dependent shape that breaks the compiled graph. Same integer counts.
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).index_add_(
        0, flat, torch.ones_like(flat))
    return order // top_idx.shape[1], order, counts


def experts_loop(x, top_idx, top_w, gate_up, down, act, act_impl: str = "eager") -> torch.Tensor:
    """The reference: transformers' per-expert loop (x [T, H], top_idx/top_w [T, k])."""
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        slot, tok = torch.where((top_idx == e).t())  # slot-major, as HF's expert_mask[e]
        if tok.numel() == 0:
            continue
        y = F.linear(_swiglu(F.linear(x[tok], gate_up[e]), act, act_impl), down[e]) * top_w[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def experts_grouped(x, top_idx, top_w, gate_up, down, act, act_impl: str = "eager") -> torch.Tensor:
    """Sort once, two grouped matmuls, weighted scatter back (x [T, H], top_idx/top_w [T, k])."""
    tok, order, counts = sort_by_expert(top_idx, gate_up.shape[0])
    y = expert_ffn(x[tok], counts, gate_up, down, act, "grouped", act_impl)
    y = y * top_w.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, tok, y.to(x.dtype))


EXPERT_FORWARD = {"loop": experts_loop, "grouped": experts_grouped}
