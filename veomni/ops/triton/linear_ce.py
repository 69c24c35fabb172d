"""Fused linear + cross-entropy in Triton (model.ops.linear_ce=triton).

The algorithm of veomni/ops/chunked_ce.py, with the same call contract (rows at loss positions
only, per-row weights such as 1/t, no ignore_index, N = 0 allowed, one backward per call): per
chunk of ``chunk_size`` rows,

  1. the logits are computed tile by tile (BLOCK_M rows x BLOCK_V vocabulary entries, tl.dot over H
     with an fp32 accumulator) into a chunk-sized fp32 buffer, and each tile also emits its row max
     and sum of exp(logit - max) and, where it holds it, the target logit;
  2. a running (online) max / rescaled sum-exp merge of those per-tile partials gives the fp32
     logsumexp and the weighted loss w * (lse - target logit) of every row;
  3. the buffer becomes g = w * (softmax - onehot) in place (in the matmul dtype);
  4. dH[chunk] = g @ W and dW += g^T @ h, Triton matmuls with fp32 accumulators.

Why a chunk-sized logits buffer rather than one kernel that recomputes the logits per tile: a fully
fused tile loop (Cut-Cross-Entropy style) must either recompute the logits once more for the
gradients (4 matmuls of N x V x H instead of 3) or accumulate dW with fp32 atomics from every row
tile (non-deterministic sums). The buffer costs chunk_size x V x 4 bytes (1024 x 152k = 0.6 GiB for
Qwen, the same as the eager chunked path) and keeps each step a plain, deterministic kernel. The
memory saving that matters here is upstream: the objective gathers the masked positions only, so
N is the number of loss tokens, not B x S.

Gradients are computed in the forward, as in the eager path (backward only scales them). Tile
sizes are fixed, untuned starting points; fp32 inputs use IEEE fp32 dots (no TF32), bf16/fp16
inputs use tensor-core dots with fp32 accumulation.
"""
from __future__ import annotations

import os

import torch

from veomni.ops.chunked_ce import DEFAULT_CHUNK_SIZE, _check_inputs, _compute_dtype, cached_gradients_backward

__all__ = ["triton_linear_cross_entropy"]

# (BLOCK_M, BLOCK_V, BLOCK_K) of the logits kernel; (BLOCK_M, BLOCK_N, BLOCK_K) of the matmuls.
_LOGITS_BLOCKS = (64, 128, 32)
_MATMUL_BLOCKS = (64, 64, 32)
_ROW_BLOCK = 64  # rows per program of the lse kernel
_PARTIAL_BLOCK = 64  # partials merged per step of the online logsumexp


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _upcast_dot(dtype: torch.dtype) -> bool:
    """bf16 dots under the interpreter are upcast to fp32 (see _linear_ce_kernels._dot)."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _matmul(a, b, c, accumulate: bool, fp32_dot: bool) -> None:
    """c (+)= a @ b, fp32 accumulator, stored in c's dtype. Any strides."""
    from veomni.ops.triton._linear_ce_kernels import _matmul_kernel

    m, k = a.shape
    n = b.shape[1]
    bm, bn, bk = _MATMUL_BLOCKS
    _matmul_kernel[(_cdiv(m, bm), _cdiv(n, bn))](
        a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        ACCUMULATE=accumulate, FP32_DOT=fp32_dot, UPCAST=_upcast_dot(a.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)


class _TritonLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, chunk_size, compute_dtype, needs_grad):
        # As in chunked_ce: an ambient autocast must not re-cast anything below.
        with torch.autocast(hidden.device.type, enabled=False):
            return _TritonLinearCE._forward(ctx, hidden, weight, targets, token_weights, chunk_size,
                                            compute_dtype, needs_grad)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, token_weights, chunk_size, compute_dtype, needs_grad):
        from veomni.ops.triton._linear_ce_kernels import _grad_logits_kernel, _logits_kernel, _lse_loss_kernel

        n, h_dim = hidden.shape
        v = weight.shape[0]
        dev = hidden.device
        fp32_dot = compute_dtype == torch.float32
        w = weight.to(compute_dtype)
        tw_all = (torch.ones(n, dtype=torch.float32, device=dev) if token_weights is None
                  else token_weights.float().contiguous())
        tgt_all = targets.contiguous()
        loss_rows = torch.zeros(n, dtype=torch.float32, device=dev)
        if needs_grad:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=dev)
            grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev)
        bm, bv, bk = _LOGITS_BLOCKS
        n_vb = _cdiv(v, bv)
        c_max = min(chunk_size, n)
        if c_max > 0:  # N = 0: nothing to launch; the loss is 0 and the gradients are zeros
            logits = torch.empty((c_max, v), dtype=torch.float32, device=dev)
            # g in the matmul dtype: in place over the fp32 logits, or its own low-precision buffer.
            g_buf = logits if fp32_dot or not needs_grad else torch.empty((c_max, v), dtype=compute_dtype, device=dev)
            pmax = torch.empty((c_max, n_vb), dtype=torch.float32, device=dev)
            psum = torch.empty_like(pmax)
            t_logit = torch.empty(c_max, dtype=torch.float32, device=dev)
            lse = torch.empty(c_max, dtype=torch.float32, device=dev)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            c = end - start
            h = hidden[start:end].to(compute_dtype)  # a view unless autocast asks for a cast
            tgt, tw = tgt_all[start:end], tw_all[start:end]
            _logits_kernel[(_cdiv(c, bm), n_vb)](
                h, w, logits, pmax, psum, tgt, t_logit, c, v, h_dim,
                h.stride(0), h.stride(1), w.stride(0), w.stride(1), logits.stride(0), pmax.stride(0),
                FP32_DOT=fp32_dot, UPCAST=_upcast_dot(compute_dtype), BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk)
            _lse_loss_kernel[(_cdiv(c, _ROW_BLOCK),)](
                pmax, psum, t_logit, tw, lse, loss_rows[start:end], c, n_vb, pmax.stride(0),
                BLOCK_M=_ROW_BLOCK, BLOCK_B=_PARTIAL_BLOCK)
            if not needs_grad:
                continue
            _grad_logits_kernel[(_cdiv(c, bm), n_vb)](
                logits, g_buf, lse, tgt, tw, c, v, logits.stride(0), g_buf.stride(0),
                BLOCK_M=bm, BLOCK_V=bv)
            g = g_buf[:c]
            _matmul(g, w, grad_hidden[start:end], accumulate=False, fp32_dot=fp32_dot)  # dH = g @ W
            _matmul(g.t(), h, grad_weight, accumulate=True, fp32_dot=fp32_dot)  # dW += g^T @ h
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.backward_done = False
        return loss_rows.sum()

    @staticmethod
    def backward(ctx, grad_output):
        return cached_gradients_backward(ctx, grad_output, "triton_linear_cross_entropy")


def triton_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """sum_i token_weights[i] * CE(hidden[i] @ weight.T, targets[i]) as a 0-d fp32 tensor: the
    contract (dtypes, autocast, N = 0, single backward) of
    veomni.ops.chunked_ce.chunked_linear_cross_entropy, computed by the Triton kernels above.
    Needs a CUDA tensor, or CPU tensors under TRITON_INTERPRET=1."""
    _check_inputs(hidden, weight, targets, token_weights, chunk_size)
    compute_dtype = _compute_dtype(hidden, weight)
    if token_weights is not None:
        token_weights = token_weights.detach()
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _TritonLinearCE.apply(hidden, weight, targets, token_weights, chunk_size, compute_dtype, needs_grad)
