"""Fused SwiGLU, silu(gate) * up, forward and backward, in Triton. Eager reference:
veomni.ops.swiglu.swiglu_eager.

Computed in fp32 and rounded once (eager rounds silu(gate) to the input dtype before the product:
in bf16 the two differ by an ulp). Backward recomputes silu from gate instead of saving it:
    d gate = dy * up * s * (1 + gate * (1 - s)),  s = sigmoid(gate);   d up = dy * silu(gate).
Inputs are read through their row strides (gate/up may be the two halves of one fused projection).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _swiglu_fwd(A, B, C, stride_am, stride_an, stride_bm, stride_bn, N, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    a = tl.load(A + row * stride_am + cols * stride_an, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * stride_bm + cols * stride_bn, mask=mask, other=0.0).to(tl.float32)
    c = a * tl.sigmoid(a) * b
    tl.store(C + row * N + cols, c.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DC, A, B, DA, DB, stride_dcm, stride_dcn, stride_am, stride_an, stride_bm, stride_bn, N,
                BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    dc = tl.load(DC + row * stride_dcm + cols * stride_dcn, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + row * stride_am + cols * stride_an, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * stride_bm + cols * stride_bn, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    silu = a * s
    da = dc * b * s * (1.0 + a * (1.0 - s))
    db = dc * silu
    tl.store(DA + row * N + cols, da.to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + row * N + cols, db.to(DB.dtype.element_ty), mask=mask)


def _grid(m: int, n: int, block: int):
    return (m, triton.cdiv(n, block))


class TritonSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        if gate.shape != up.shape:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
        shape, n = gate.shape, gate.shape[-1]
        a, b = gate.reshape(-1, n), up.reshape(-1, n)
        m = a.shape[0]
        out = torch.empty((m, n), dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        block = min(_BLOCK, triton.next_power_of_2(n))
        if m and n:
            _swiglu_fwd[_grid(m, n, block)](a, b, out, a.stride(0), a.stride(1), b.stride(0), b.stride(1), n,
                                           BLOCK_N=block)
        ctx.save_for_backward(a, b)
        ctx.shape, ctx.block = shape, block
        return out.view(shape)

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        m, n = a.shape
        dc2 = dc.reshape(m, n)
        da = torch.empty((m, n), dtype=a.dtype, device=a.device)
        db = torch.empty((m, n), dtype=b.dtype, device=b.device)
        if m and n:
            _swiglu_bwd[_grid(m, n, ctx.block)](dc2, a, b, da, db, dc2.stride(0), dc2.stride(1), a.stride(0),
                                               a.stride(1), b.stride(0), b.stride(1), n, BLOCK_N=ctx.block)
        return da.view(ctx.shape), db.view(ctx.shape)


def triton_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return TritonSwiGLU.apply(gate, up)
