"""Fused RMSNorm, forward and backward, in Triton. Eager reference: veomni.ops.rms_norm.rms_norm_eager.

    standard (HF Llama):    y = w * cast(x * rstd)          rstd = 1 / sqrt(mean(x^2) + eps), in fp32
    zero-centred (Qwen3.5): y = cast(x * rstd * (1 + w))    the product in fp32, then the cast

One program normalises one row in forward. In backward each program walks a strip of rows, writes
their dx, and accumulates its share of dw in fp32 registers; the strips' partial sums ([programs, N]
fp32) are added by torch, so dw never accumulates in bf16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd(X, Y, W, RSTD, stride_xm, stride_xn, stride_ym, N, eps,
                  ZERO_CENTRED: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x_raw = tl.load(X + row * stride_xm + cols * stride_xn, mask=mask, other=0.0)
    x = x_raw.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0)
    if ZERO_CENTRED:
        y = x * rstd * (1.0 + w.to(tl.float32))
    else:
        # HF's order: cast the normalised row back to the input dtype, then multiply by the weight.
        y = (x * rstd).to(x_raw.dtype) * w
    tl.store(Y + row * stride_ym + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd(DY, X, W, RSTD, DX, DW_PART, stride_dym, stride_xm, stride_xn, stride_dxm, M, N,
                  rows_per_prog, ZERO_CENTRED: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    g = 1.0 + w if ZERO_CENTRED else w
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    start = pid * rows_per_prog
    for i in range(rows_per_prog):
        row = (start + i).to(tl.int64)
        if row < M:
            x_raw = tl.load(X + row * stride_xm + cols * stride_xn, mask=mask, other=0.0)
            x = x_raw.to(tl.float32)
            dy = tl.load(DY + row * stride_dym + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            xhat = x * rstd
            if ZERO_CENTRED:
                dw += dy * xhat
            else:
                dw += dy * (xhat.to(x_raw.dtype).to(tl.float32))  # the weight saw the cast row
            dxhat = dy * g
            # d/dx of x * rstd(x): rstd * (dxhat - xhat * mean(dxhat * xhat)).
            dx = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=0) / N))
            tl.store(DX + row * stride_dxm + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PART + pid * N + cols, dw, mask=mask)


def _num_warps(block: int) -> int:
    return 8 if block >= 4096 else 4 if block >= 1024 else 2 if block >= 256 else 1


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [M, N] rows: a view where the strides allow (a head slice of a fused projection), a
    copy only where they do not. The kernels take both strides, so no .contiguous() is needed."""
    return x.reshape(-1, x.shape[-1])


class TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, zero_centred: bool):
        shape, n = x.shape, x.shape[-1]
        x2 = _rows(x)
        m = x2.shape[0]
        out_dtype = x.dtype if zero_centred else torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty((m, n), dtype=out_dtype, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n)
        if m:
            _rms_norm_fwd[(m,)](x2, y, weight, rstd, x2.stride(0), x2.stride(1), y.stride(0), n, eps,
                                ZERO_CENTRED=zero_centred, BLOCK_N=block, num_warps=_num_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.zero_centred, ctx.shape, ctx.block = zero_centred, shape, block
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = dy.reshape(m, n)
        if dy2.stride(1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
        # Enough programs to fill a GPU, few enough that the [programs, N] fp32 partials stay small.
        progs = max(1, min(m, 4 * torch.cuda.get_device_properties(x2.device).multi_processor_count
                           if x2.is_cuda else 8))
        rows_per_prog = triton.cdiv(m, progs) if m else 1
        dw_part = torch.zeros((progs, n), dtype=torch.float32, device=x2.device)
        if m:
            _rms_norm_bwd[(progs,)](dy2, x2, weight, rstd, dx, dw_part, dy2.stride(0), x2.stride(0),
                                    x2.stride(1), dx.stride(0), m, n, rows_per_prog,
                                    ZERO_CENTRED=ctx.zero_centred, BLOCK_N=ctx.block,
                                    num_warps=_num_warps(ctx.block))
        dw = dw_part.sum(0).to(weight.dtype)
        return dx.view(ctx.shape), dw, None, None


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centred: bool = False) -> torch.Tensor:
    return TritonRMSNorm.apply(x, weight, eps, zero_centred)
