"""Gated DeltaNet (GDN) kernels for the Qwen3.5 / Qwen3-Next linear-attention layers.

Per value head the state S is a Dk x Dv matrix. For every token t:

    S <- exp(g_t) * S                       g_t <= 0 is a log-decay
    m  = S^T k_t                            what the state already predicts for k_t
    S <- S + k_t (beta_t (v_t - m))^T       delta-rule write of the correction only
    o_t = S^T q_t                           the output reads the state *after* token t

i.e. S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T. q and k are L2-normalised
per head and q is scaled by Dk^-1/2; each q/k head serves Hv/Hk consecutive value heads.

Packing. Our rows hold several documents (`segment_ids` 1,1,1,2,2,0,0). Both the short conv and
the recurrence must restart at every document start, otherwise a document reads its predecessor
(transformers' torch path drops `cu_seqlens` and its conv has no reset, so it leaks). Here every
function that takes `cu_seqlens` treats it as boundaries over the flattened B*T tokens, the same
convention as flash-attention / fla varlen, and `segment_cu_seqlens` builds it from segment ids.

Implementations (`model.ops.gdn`, see veomni/ops/registry.py):

  torch  `chunk_gated_delta_rule` in the chunked UT/WY form, fp32 (fp64 stays fp64), plain torch
         ops so autograd is exact. Documents are cut into chunks that never straddle a document;
         all chunks of all documents get their intra-chunk work in one batch, and the only Python
         loop is over chunk index within a document (ceil(longest document / chunk_size) steps).
  fla    flash-linear-attention's Triton kernels (`pip install flash-linear-attention`), CUDA only.
         A missing package is an error, never a silent switch to torch.

`recurrent_gated_delta_rule` is the per-token recurrence: the test reference, and the cheap path
for one-token decode steps. `reverse_segments` flips time inside every document, for the
anti-causal scan of a bidirectional GDN: o_rev = reverse(GDN(reverse(x))).

Only torch is imported at module level; fla is imported when its path is chosen.
"""
from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F

GDN_IMPLS = ("torch", "fla")

_FLA_HINT = ("model.ops.gdn=fla needs the flash-linear-attention package with CUDA "
             "(pip install flash-linear-attention); or run the pure-torch path with --model.ops.gdn=torch")


def check_gdn_impl(impl: str) -> str:
    if impl not in GDN_IMPLS:
        raise ValueError(f"model.ops.gdn={impl!r} is not one of {GDN_IMPLS} "
                         "(torch: chunked delta rule in plain torch, any device; "
                         "fla: flash-linear-attention Triton kernels, CUDA)")
    return impl


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # eps inside the rsqrt, as fla and transformers do, so a zero vector maps to zero, not NaN.
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


# ----------------------------------------------------------------------------------------------
# Sequence boundaries
# ----------------------------------------------------------------------------------------------


def segment_cu_seqlens(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] segment ids -> cumulative boundaries [N+1] over the flattened B*T tokens.

    A document starts at every row start and wherever the id changes inside a row. A padding run
    (id 0) becomes a document of its own: its outputs are garbage the loss ignores, but it must
    not feed state into the next row's first document, and a row start always resets."""
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [B, T], got shape {tuple(segment_ids.shape)}")
    B, T = segment_ids.shape
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = start.reshape(-1).nonzero().squeeze(-1)
    end = torch.tensor([B * T], dtype=torch.long, device=segment_ids.device)
    return torch.cat([starts.to(torch.long), end])


def _check_cu(cu_seqlens: torch.Tensor, total: int, device) -> tuple[torch.Tensor, list[int]]:
    cu = cu_seqlens.to(device=device, dtype=torch.long).reshape(-1)
    cu_list = cu.tolist()  # one host sync: loop bounds and chunk counts are Python ints
    if len(cu_list) < 2 or cu_list[0] != 0 or cu_list[-1] != total:
        raise ValueError(f"cu_seqlens must run from 0 to B*T={total}, got {cu_list[:4]}...{cu_list[-2:]}")
    if any(b < a for a, b in pairwise(cu_list)):
        raise ValueError("cu_seqlens must be non-decreasing")
    return cu, cu_list


def _rows_cu(B: int, T: int, device) -> tuple[torch.Tensor, list[int]]:
    cu_list = [i * T for i in range(B + 1)]
    return torch.tensor(cu_list, dtype=torch.long, device=device), cu_list


def _token_doc(cu: torch.Tensor, total: int) -> torch.Tensor:
    """Document index of every flattened token (empty documents are skipped correctly)."""
    pos = torch.arange(total, device=cu.device)
    return torch.searchsorted(cu[1:], pos, right=True)


def reverse_segments(x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Reverse time inside every segment of the flattened B*T tokens (rows when cu_seqlens is
    None). An involution; a plain gather, so autograd passes through."""
    if cu_seqlens is None:
        return x.flip(1)
    B, T = x.shape[:2]
    cu, _ = _check_cu(cu_seqlens, B * T, x.device)
    doc = _token_doc(cu, B * T)
    pos = torch.arange(B * T, device=x.device)
    src = cu[doc] + cu[doc + 1] - 1 - pos
    return x.reshape(B * T, *x.shape[2:])[src].reshape(x.shape)


# ----------------------------------------------------------------------------------------------
# Short causal convolution
# ----------------------------------------------------------------------------------------------


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return y
    if activation in ("silu", "swish"):
        return F.silu(y)
    raise ValueError(f"activation must be 'silu' or None, got {activation!r}")


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                  activation: str | None = "silu", impl: str = "torch") -> torch.Tensor:
    """Depthwise causal conv over time, x [B, T, C], weight [C, K], no bias, then the activation.

    Output t sees inputs t-K+1..t of its own document only; earlier positions count as zero.
    With cu_seqlens the documents are segments of the flattened B*T tokens."""
    check_gdn_impl(impl)
    B, T, C = x.shape
    K = weight.shape[-1]
    if weight.shape != (C, K):
        raise ValueError(f"weight must be [C={C}, K], got {tuple(weight.shape)}")
    if impl == "fla":
        return _fla_conv(x, weight, cu_seqlens, activation)

    w = weight.unsqueeze(1)  # [C, 1, K] for a grouped (depthwise) conv1d
    if cu_seqlens is None:
        # Rows are independent sequences: left zero padding is the document reset.
        y = F.conv1d(x.to(weight.dtype).transpose(1, 2), w, padding=K - 1, groups=C)[..., :T]
        return _activate(y, activation).transpose(1, 2).to(x.dtype)

    # Packed: lay the documents end to end with K-1 zero columns in front of each one, so one
    # unpadded conv1d over the whole stream cannot reach from a document into the previous one.
    # Only one copy of x is made (and saved for backward), unlike a masked sum over K shifts.
    total = B * T
    cu, cu_list = _check_cu(cu_seqlens, total, x.device)
    doc = _token_doc(cu, total)
    pos = torch.arange(total, device=x.device)
    dest = pos + (K - 1) * (doc + 1)
    stream_len = total + (K - 1) * (len(cu_list) - 1)
    xf = x.reshape(total, C).to(weight.dtype)
    stream = xf.new_zeros(stream_len, C).index_copy(0, dest, xf)
    y = F.conv1d(stream.t().unsqueeze(0), w, groups=C)[0]  # output j ends at stream index j+K-1
    y = y[:, dest - (K - 1)].t()
    return _activate(y, activation).reshape(B, T, C).to(x.dtype)


def causal_conv1d_step(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                       activation: str | None = "silu") -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step: x [B, C], conv_state [B, C, K-1] (the previous K-1 inputs, oldest first).
    Returns (y [B, C], new conv_state); the state is not modified in place."""
    window = torch.cat([conv_state.to(weight.dtype), x.to(weight.dtype).unsqueeze(-1)], dim=-1)
    y = (window * weight).sum(-1)
    return _activate(y, activation).to(x.dtype), window[..., 1:].to(conv_state.dtype)


def conv_state_from_prefix(x: torch.Tensor, K: int) -> torch.Tensor:
    """The conv state after a prefill of x [B, T, C]: its last K-1 inputs as [B, C, K-1], zero
    padded on the left when T < K-1 (those positions precede the sequence)."""
    tail = x[:, max(0, x.shape[1] - (K - 1)):].transpose(1, 2)
    return F.pad(tail, (K - 1 - tail.shape[-1], 0))


# ----------------------------------------------------------------------------------------------
# Gated delta rule
# ----------------------------------------------------------------------------------------------


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm):
    """Shape checks, compute dtype (fp32, or fp64 when given fp64), l2norm + scale, and q/k
    repeated to the value heads. Returns flattened [B*T, ...] tensors."""
    if q.shape != k.shape or q.dim() != 4:
        raise ValueError(f"q and k must both be [B, T, Hk, Dk], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, Hk, Dk = q.shape
    if v.dim() != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v must be [B, T, Hv, Dv], got {tuple(v.shape)}")
    Hv = v.shape[2]
    if Hv % Hk != 0:
        raise ValueError(f"value heads ({Hv}) must be a multiple of key heads ({Hk})")
    for name, t in (("g", g), ("beta", beta)):
        if t.shape != (B, T, Hv):
            raise ValueError(f"{name} must be [B, T, Hv]={(B, T, Hv)}, got {tuple(t.shape)}")
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, g, beta = (t.to(dt) for t in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * (Dk ** -0.5 if scale is None else scale)
    if Hv != Hk:
        # Value head h reads q/k head h // (Hv/Hk), the layout of transformers' repeat_interleave.
        q = q.repeat_interleave(Hv // Hk, dim=2)
        k = k.repeat_interleave(Hv // Hk, dim=2)
    flat = lambda t: t.reshape(B * T, *t.shape[2:])
    return tuple(flat(t) for t in (q, k, v, g, beta)) + (dt,)


def _initial(initial_state, N, Hv, Dk, Dv, dt, device):
    if initial_state is None:
        return torch.zeros(N, Hv, Dk, Dv, dtype=dt, device=device)
    if initial_state.shape != (N, Hv, Dk, Dv):
        raise ValueError(f"initial_state must be [N={N}, Hv={Hv}, Dk={Dk}, Dv={Dv}] (one per sequence), "
                         f"got {tuple(initial_state.shape)}")
    return initial_state.to(dt)


def _with_zero_row(t: torch.Tensor) -> torch.Tensor:
    # Index B*T points at this row: the padding token (q=k=v=0, g=0, beta=0) leaves S unchanged.
    return torch.cat([t, t.new_zeros(1, *t.shape[1:])])


def chunk_gated_delta_rule(q, k, v, g, beta, *, scale: float | None = None,
                           cu_seqlens: torch.Tensor | None = None,
                           initial_state: torch.Tensor | None = None,
                           output_final_state: bool = False, use_qk_l2norm: bool = True,
                           chunk_size: int = 64, impl: str = "torch"):
    """Gated delta rule over whole sequences.

    q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g (log-decay, <= 0) and beta [B, T, Hv].
    Sequences: the B rows, or with cu_seqlens [N+1] the documents of the flattened B*T tokens.
    initial_state [N, Hv, Dk, Dv] per sequence. Returns (o [B, T, Hv, Dv] in q's dtype,
    final_state [N, Hv, Dk, Dv] in fp32 (fp64 for fp64 input) or None).
    chunk_size only shapes the torch computation (fla uses its own); the result does not depend
    on it beyond rounding."""
    check_gdn_impl(impl)
    if impl == "fla":
        return _fla_chunk(q, k, v, g, beta, scale, cu_seqlens, initial_state, output_final_state,
                          use_qk_l2norm)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    out_dtype = q.dtype
    B, T = q.shape[:2]
    qf, kf, vf, gf, bf, dt = _prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    Hv, Dk, Dv = vf.shape[1], kf.shape[-1], vf.shape[-1]
    total, device, C = B * T, qf.device, chunk_size
    cu, cu_list = _check_cu(cu_seqlens, total, device) if cu_seqlens is not None else _rows_cu(B, T, device)
    N = len(cu_list) - 1
    h0 = _initial(initial_state, N, Hv, Dk, Dv, dt, device)

    # Chunk layout. Sort sequences by chunk count (descending) so that the sequences still running
    # at step j are a prefix; chunk m is (sequence, j), listed step by step, so step j's chunks are
    # one contiguous slice. A chunk never straddles two documents; a document's last chunk is
    # padded with the zero row. Padding costs < chunk_size tokens per document, whatever the mix
    # of lengths (padding every document to the longest one could cost N times the tokens).
    lens = [b - a for a, b in pairwise(cu_list)]
    nch = [-(-n // C) for n in lens]
    order = sorted(range(N), key=lambda i: -nch[i])
    n_sorted = [nch[i] for i in order]
    steps = n_sorted[0] if N else 0
    active = [sum(1 for c in n_sorted if c > j) for j in range(steps)] + [0]
    order_t = torch.tensor(order, dtype=torch.long, device=device)
    live = torch.arange(steps, device=device)[:, None] < torch.tensor(n_sorted, device=device)[None, :]
    step_of, rank_of = live.nonzero(as_tuple=True)  # row-major: step-major, rank ascending
    seq_of = order_t[rank_of]
    offs = torch.arange(C, device=device)
    within = step_of[:, None] * C + offs[None, :]  # [M, C] position inside the document
    valid = within < (cu[seq_of + 1] - cu[seq_of])[:, None]
    idx = torch.where(valid, cu[seq_of][:, None] + within, torch.full_like(within, total))
    M = idx.shape[0]

    def chunks(t):  # [B*T, H, ...] -> [M, H, C, ...]
        return _with_zero_row(t)[idx].transpose(1, 2)

    qc, kc, vc = chunks(qf), chunks(kf), chunks(vf)          # [M, H, C, D]
    gc, bc = chunks(gf), chunks(bf)                           # [M, H, C]

    # Intra-chunk work, all chunks at once. G = cumulative log-decay from the chunk start; the
    # decay from token j to token i (j <= i) is exp(G_i - G_j). Future pairs are set to -inf
    # before exp: G_i - G_j > 0 there and could overflow.
    G = gc.cumsum(-1)
    causal = torch.ones(C, C, dtype=torch.bool, device=device).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    kb = kc * bc[..., None]
    # Within a chunk the corrections u'_i = beta_i (v_i - S_{i-1}^T k_i) solve the unit lower
    # triangular system (I + A) U' = beta V - diag(beta e^G) K S_0, A_ij = beta_i k_i.k_j e^{G_i-G_j}
    # for j < i. Solving once for both right-hand sides gives U' = u - w S_0.
    A = ((kb @ kc.transpose(-1, -2)) * decay).tril(-1)
    rhs = torch.cat([vc * bc[..., None], kb * G.exp()[..., None]], dim=-1)
    sol = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    u, w = sol[..., :Dv], sol[..., Dv:]
    # o_i = e^{G_i} S_0^T q_i + sum_{j<=i} e^{G_i-G_j} (q_i.k_j) u'_j, and the state at the chunk
    # end is e^{G_C} S_0 + sum_j e^{G_C-G_j} k_j u'_j^T. Fold the decays into q and k once.
    attn = (qc @ kc.transpose(-1, -2)) * decay
    q_dec = qc * G.exp()[..., None]
    k_dec = kc * (G[..., -1:] - G).exp()[..., None]
    chunk_decay = G[..., -1].exp()[..., None, None]

    S = h0[order_t]  # sequence states in sorted (rank) order; shrinks as sequences finish
    outs, finished = [], []
    start = 0
    for j in range(steps):
        a = active[j]
        sl = slice(start, start + a)
        start += a
        S = S[:a]
        u_new = u[sl] - w[sl] @ S
        outs.append(q_dec[sl] @ S + attn[sl] @ u_new)
        S = S * chunk_decay[sl] + k_dec[sl].transpose(-1, -2) @ u_new
        if active[j + 1] < a:
            finished.append(S[active[j + 1]:])  # ranks active[j+1] .. a-1 end at this step
    if N == 0 or M == 0:
        o_chunks = qf.new_zeros(0, Hv, C, Dv)
    else:
        o_chunks = torch.cat(outs)

    # Back to token order: token idx[m, c] is element m*C + c of the chunked output.
    flat_pos = torch.arange(M * C, device=device).reshape(M, C)
    src = torch.empty(total, dtype=torch.long, device=device)
    src[idx[valid]] = flat_pos[valid]
    o = o_chunks.transpose(1, 2).reshape(M * C, Hv, Dv)[src]
    o = o.reshape(B, T, Hv, Dv).to(out_dtype)

    if not output_final_state:
        return o, None
    # finished[] covers ranks in descending blocks; sequences with no token keep h0.
    ranked = torch.cat(finished[::-1] + [h0[order_t][active[0] if steps else 0:]])
    inv = torch.empty_like(order_t)
    inv[order_t] = torch.arange(N, device=device)
    return o, ranked[inv]


def recurrent_gated_delta_rule(q, k, v, g, beta, *, scale: float | None = None,
                               cu_seqlens: torch.Tensor | None = None,
                               initial_state: torch.Tensor | None = None,
                               output_final_state: bool = False, use_qk_l2norm: bool = True):
    """The per-token recurrence, same arguments and returns as `chunk_gated_delta_rule`.

    Sequences are gathered into a [N, longest] batch whose tail is the zero row, which leaves the
    state unchanged, so the state after the last step is every sequence's final state."""
    out_dtype = q.dtype
    B, T = q.shape[:2]
    qf, kf, vf, gf, bf, dt = _prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    Hv, Dk, Dv = vf.shape[1], kf.shape[-1], vf.shape[-1]
    total, device = B * T, qf.device
    cu, cu_list = _check_cu(cu_seqlens, total, device) if cu_seqlens is not None else _rows_cu(B, T, device)
    N = len(cu_list) - 1
    S = _initial(initial_state, N, Hv, Dk, Dv, dt, device)
    L = max(b - a for a, b in pairwise(cu_list))
    t = torch.arange(L, device=device)
    lens = cu[1:] - cu[:-1]
    idx = torch.where(t[None, :] < lens[:, None], cu[:-1, None] + t[None, :], torch.full((N, L), total, device=device))
    qs, ks, vs, gs, bs = (_with_zero_row(x)[idx] for x in (qf, kf, vf, gf, bf))  # [N, L, H, ...]

    outs = []
    for i in range(L):
        S = S * gs[:, i].exp()[..., None, None]
        m = (S * ks[:, i, :, :, None]).sum(-2)                            # S^T k   [N, H, Dv]
        S = S + ks[:, i, :, :, None] * (bs[:, i, :, None] * (vs[:, i] - m))[:, :, None, :]
        outs.append((S * qs[:, i, :, :, None]).sum(-2))                   # S^T q
    o_pad = torch.stack(outs, 1) if L else vf.new_zeros(N, 0, Hv, Dv)
    doc = _token_doc(cu, total)
    o = o_pad[doc, torch.arange(total, device=device) - cu[doc]]
    o = o.reshape(B, T, Hv, Dv).to(out_dtype)
    return o, (S if output_final_state else None)


# ----------------------------------------------------------------------------------------------
# fla (flash-linear-attention) path
# ----------------------------------------------------------------------------------------------


def _require_cuda(*tensors):
    for t in tensors:
        if not t.is_cuda:
            raise RuntimeError(f"{_FLA_HINT}; got a tensor on {t.device}")


def _fla_chunk(q, k, v, g, beta, scale, cu_seqlens, initial_state, output_final_state, use_qk_l2norm):
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    except ImportError as e:
        raise ImportError(_FLA_HINT) from e
    _require_cuda(q, k, v, g, beta)
    B, T, Hk, _ = q.shape
    Hv = v.shape[2]
    if Hv % Hk != 0:
        raise ValueError(f"value heads ({Hv}) must be a multiple of key heads ({Hk})")
    if Hv != Hk:
        # Older fla releases require equal heads; repeating is valid for all of them.
        q = q.repeat_interleave(Hv // Hk, dim=2)
        k = k.repeat_interleave(Hv // Hk, dim=2)
    kwargs = {}
    if cu_seqlens is not None:
        # fla's varlen convention: one row holding all sequences back to back.
        q, k, v, g, beta = (t.reshape(1, B * T, *t.shape[2:]) for t in (q, k, v, g, beta))
        kwargs["cu_seqlens"] = cu_seqlens.to(device=q.device, dtype=torch.long)
    if initial_state is not None:
        initial_state = initial_state.float()
    o, final = fla_chunk(q.contiguous(), k.contiguous(), v.contiguous(), g.float().contiguous(),
                         beta.contiguous(), scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state,
                         use_qk_l2norm_in_kernel=use_qk_l2norm, **kwargs)
    return o.reshape(B, T, *o.shape[2:]), final


def _fla_conv(x, weight, cu_seqlens, activation):
    try:
        try:
            from fla.modules.causal_conv1d import causal_conv1d as fla_conv
        except ImportError:
            from fla.modules.convolution import (
                causal_conv1d as fla_conv,  # fla < 0.5 layout
            )
    except ImportError as e:
        raise ImportError(_FLA_HINT) from e
    _require_cuda(x, weight)
    B, T, C = x.shape
    kwargs = {}
    if cu_seqlens is not None:
        x = x.reshape(1, B * T, C)
        kwargs["cu_seqlens"] = cu_seqlens.to(device=x.device, dtype=torch.long)
    y = fla_conv(x.contiguous(), weight, activation=activation, **kwargs)
    y = y[0] if isinstance(y, tuple) else y
    return y.reshape(B, T, C)
