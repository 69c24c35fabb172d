"""The Triton kernels of veomni/ops/triton/linear_ce.py (imported only by it, lazily: this module
imports triton at the top).

Per chunk of c rows (hidden h [c, H], head W [V, H], targets, per-row weights tw):

  _logits_kernel        one program per (BLOCK_M rows, BLOCK_V vocabulary columns) tile: the fp32
                        logits tile h @ W_tile^T (tl.dot over H in BLOCK_K steps, fp32 accumulator),
                        stored in the chunk buffer, plus the tile's row max, its sum of
                        exp(logit - max) and, in the tile that holds it, the target logit.
  _lse_loss_kernel      per BLOCK_M rows: the online (running max / rescaled sum-exp) merge of the
                        per-tile partials into logsumexp, and the weighted loss tw * (lse - target).
  _grad_logits_kernel   per tile: g = tw * (softmax - onehot), written in the matmul dtype (in place
                        over the fp32 logits when that dtype is fp32).
  _matmul_kernel        C (+)= A @ B with an fp32 accumulator and arbitrary strides: dH = g @ W and
                        dW += g^T @ h.

Tile sizes are fixed, untuned starting points for Hopper-class GPUs (see linear_ce.py).
"""
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with an fp32 accumulator. FP32_DOT: fp32 inputs, IEEE products (no TF32, as
    the reference's fp32 matmul). UPCAST: bf16 inputs under TRITON_INTERPRET=1, whose tl.dot
    multiplies the raw bf16 bit patterns as integers (triton 3.x interpreter); a bf16 x bf16 product
    is exact in fp32, so upcasting first gives the tensor-core result up to summation order."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif FP32_DOT:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _logits_kernel(H, W, LOGITS, PMAX, PSUM, TGT, TGT_LOGIT, M, V, K,
                   stride_hm, stride_hk, stride_wv, stride_wk, stride_lm, stride_pm,
                   FP32_DOT: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    # int64 offsets: chunk x V elements (8192 x 256k) overflow int32 pointer arithmetic.
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < V
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        # Out-of-range rows / columns / k load 0: they add nothing to the valid dot products.
        h = tl.load(H + rows[:, None] * stride_hm + ks[None, :] * stride_hk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_t = tl.load(W + ks[:, None] * stride_wk + cols[None, :] * stride_wv,
                      mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(h, w_t, acc, FP32_DOT, UPCAST)
    tl.store(LOGITS + rows[:, None] * stride_lm + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])
    # Columns past V must not enter the max / sum-exp (they hold 0, a plausible logit).
    masked = tl.where(col_ok[None, :], acc, float("-inf"))
    m = tl.max(masked, axis=1)
    s = tl.sum(tl.exp(masked - m[:, None]), axis=1)
    tl.store(PMAX + rows * stride_pm + pid_v, m, mask=row_ok)
    tl.store(PSUM + rows * stride_pm + pid_v, s, mask=row_ok)
    tgt = tl.load(TGT + rows, mask=row_ok, other=-1)
    t_logit = tl.sum(tl.where(cols[None, :] == tgt[:, None], acc, 0.0), axis=1)
    in_tile = (tgt >= pid_v * BLOCK_V) & (tgt < pid_v * BLOCK_V + BLOCK_V)
    tl.store(TGT_LOGIT + rows, t_logit, mask=row_ok & in_tile)


@triton.jit
def _lse_loss_kernel(PMAX, PSUM, TGT_LOGIT, TW, LSE, LOSS, M, NVB, stride_pm,
                     BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for b0 in range(0, NVB, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        ok = row_ok[:, None] & (bs < NVB)[None, :]
        pm = tl.load(PMAX + rows[:, None] * stride_pm + bs[None, :], mask=ok, other=float("-inf"))
        # Rows past M get max 0 instead of -inf, whose exp(-inf - -inf) would be NaN (never stored,
        # but the interpreter warns about it).
        pm = tl.where(row_ok[:, None], pm, 0.0)
        ps = tl.load(PSUM + rows[:, None] * stride_pm + bs[None, :], mask=ok, other=0.0)
        m_new = tl.maximum(m, tl.max(pm, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(ps * tl.exp(pm - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(tl.where(row_ok, s, 1.0))  # rows past M have s = 0
    tw = tl.load(TW + rows, mask=row_ok, other=0.0)
    t_logit = tl.load(TGT_LOGIT + rows, mask=row_ok, other=0.0)
    tl.store(LSE + rows, lse, mask=row_ok)
    tl.store(LOSS + rows, tw * (lse - t_logit), mask=row_ok)


@triton.jit
def _grad_logits_kernel(LOGITS, G, LSE, TGT, TW, M, V, stride_lm, stride_gm,
                        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < M
    ok = row_ok[:, None] & (cols < V)[None, :]
    logits = tl.load(LOGITS + rows[:, None] * stride_lm + cols[None, :], mask=ok, other=0.0)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    tw = tl.load(TW + rows, mask=row_ok, other=0.0)
    tgt = tl.load(TGT + rows, mask=row_ok, other=-1)
    onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
    g = tw[:, None] * (tl.exp(logits - lse[:, None]) - onehot)  # d(tw * CE) / d logits
    tl.store(G + rows[:, None] * stride_gm + cols[None, :], g.to(G.dtype.element_ty), mask=ok)


@triton.jit
def _matmul_kernel(A, B, C, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   ACCUMULATE: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: see _logits_kernel
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)  # dW: g^T's k stride is V
        k_ok = ks < K
        a = tl.load(A + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(B + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, FP32_DOT, UPCAST)
    c_ptrs = C + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    ok = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:  # dW over the chunks: C is the fp32 accumulator
        acc += tl.load(c_ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=ok)
