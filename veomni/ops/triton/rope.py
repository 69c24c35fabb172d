"""RoPE (HF's rotate-half convention), forward and backward, in Triton, partial rotary included.
Eager reference: veomni.ops.rope.apply_rope_eager.

x [B, H, S, D] (any strides: q/k arrive as transposed projections), cos/sin [B, S, R] with R <= D
(any strides; a broadcast batch has stride 0). The first R dims rotate, dims R..D pass through:
    y1 = x1 * cos1 - x2 * sin1,   y2 = x2 * cos2 + x1 * sin2        (halves of the R rotary dims)
Backward is the transpose of that linear map (the inverse rotation when cos/sin halves agree):
    dx1 = dy1 * cos1 + dy2 * sin2,   dx2 = dy2 * cos2 - dy1 * sin1
Both halves of cos/sin are read, so the kernel is the exact derivative of the eager formula for any
cos/sin, not only cos = cat(freqs, freqs). One program handles one (b, s) position for a block of
heads; math in fp32, the output contiguous [B, H, S, D] in x's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(X, Y, COS, SIN, S, H, R2, P,
                 sxb, sxh, sxs, sxd, syb, syh, sys_, scb, scs, scr, ssb, sss, ssr,
                 BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // S
    s = pid % S
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    r = tl.arange(0, BLOCK_R)
    rmask = r < R2
    c1 = tl.load(COS + b * scb + s * scs + r * scr, mask=rmask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + b * scb + s * scs + (r + R2) * scr, mask=rmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + b * ssb + s * sss + r * ssr, mask=rmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + b * ssb + s * sss + (r + R2) * ssr, mask=rmask, other=0.0).to(tl.float32)
    x_row = X + b * sxb + s * sxs + heads[:, None] * sxh
    y_row = Y + b * syb + s * sys_ + heads[:, None] * syh
    m = hmask[:, None] & rmask[None, :]
    x1 = tl.load(x_row + r[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + (r[None, :] + R2) * sxd, mask=m, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1[None, :] + x2 * s2[None, :]
        y2 = x2 * c2[None, :] - x1 * s1[None, :]
    else:
        y1 = x1 * c1[None, :] - x2 * s1[None, :]
        y2 = x2 * c2[None, :] + x1 * s2[None, :]
    tl.store(y_row + r[None, :], y1.to(Y.dtype.element_ty), mask=m)
    tl.store(y_row + (r[None, :] + R2), y2.to(Y.dtype.element_ty), mask=m)
    if BLOCK_P > 0:  # partial rotary: dims 2 * R2 .. 2 * R2 + P are copied (forward and backward)
        p = tl.arange(0, BLOCK_P)
        pm = hmask[:, None] & (p < P)[None, :]
        xp = tl.load(x_row + (2 * R2 + p[None, :]) * sxd, mask=pm, other=0.0)
        tl.store(y_row + (2 * R2 + p[None, :]), xp.to(Y.dtype.element_ty), mask=pm)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    bsz, heads, slen, dim = x.shape
    rot = cos.shape[-1]
    cos, sin = cos.expand(bsz, slen, rot), sin.expand(bsz, slen, rot)
    y = torch.empty((bsz, heads, slen, dim), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_h = min(triton.next_power_of_2(heads), 16)
    block_r = triton.next_power_of_2(rot // 2)
    block_p = triton.next_power_of_2(dim - rot) if dim > rot else 0
    grid = (bsz * slen, triton.cdiv(heads, block_h))
    _rope_kernel[grid](x, y, cos, sin, slen, heads, rot // 2, dim - rot,
                       *x.stride(), y.stride(0), y.stride(1), y.stride(2), *cos.stride(), *sin.stride(),
                       BACKWARD=backward, BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_P=block_p)
    return y


class TritonRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        rot = cos.shape[-1]
        if rot % 2 or rot > q.shape[-1] or sin.shape != cos.shape:
            raise ValueError(f"rope: cos/sin {tuple(cos.shape)}/{tuple(sin.shape)} must be [B, S, R] with even "
                             f"R <= head_dim {q.shape[-1]}")
        ctx.save_for_backward(cos, sin)
        return _rope(q, cos, sin, False), _rope(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        # cos/sin come from RotaryEmbedding under no_grad: no gradient flows to them.
        return _rope(dq, cos, sin, True), _rope(dk, cos, sin, True), None, None


def triton_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return TritonRope.apply(q, k, cos, sin)
