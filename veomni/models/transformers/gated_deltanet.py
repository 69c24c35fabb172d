"""Gated DeltaNet (GDN), the linear-attention mixer of the Qwen3.5 hybrids (single device, torch).

Computation (transformers' Qwen3_5GatedDeltaNet, whose parameter names we keep):
    [q | k | v] = in_proj_qkv(x) -> causal depthwise conv (kernel 4) -> SiLU
    q, k L2-normalised per head (q also scaled by d_k^-1/2); each q/k head serves H_v/H_k value heads
    beta = sigmoid(in_proj_b(x)),  g = -exp(A_log) * softplus(in_proj_a(x) + dt_bias)   (log decay)
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t
    out = out_proj(RMSNorm(o) * SiLU(in_proj_z(x)))                     (gated norm, per head)
Padding positions are zeroed before the projections, as HF does.

Packing: the scan and the conv window restart at every document (veomni/ops/gdn.py takes the
document boundaries as cu_seqlens); HF's torch path does not, and leaks one document into the next.

Diffusion modes (docs/models.md, "Hybrid models"):
  causal         the forward scan only: the AR model, equal to HF.
  bidirectional  forward scan + a reverse scan of each flipped document (Hydra / LION style), with
                 the same projections, conv and gates, combined per value head as
                 o = o_fwd + reverse_gate[h] * o_rev. reverse_gate is ours (not in HF checkpoints) and
                 starts at 0, so a freshly loaded AR checkpoint computes exactly the AR function and
                 training opens the right context as it learns the gate.
  block_causal   the forward scan over the whole document (causal across blocks) + the reverse scan
                 restricted to each block (blocks by position id, like the attention mask): a
                 token sees everything before it and the rest of its own block.
The op switch `model.ops.gdn` (torch | fla) picks the kernels of the scans and the conv.

Decoding with a cache (the samplers' KV cache, veomni/models/kv_cache.py): a GDN layer caches its
per-token inputs (pre-conv [q|k|v], beta, g) under the same row-index and per-row-window rules as
attention's keys and values, so it sees exactly what an attention layer sees. The forward scan of
a call over rows [q0, q1) starts from a recurrent-state snapshot: the cache keeps the state after
[0, j) for the j where earlier calls started (a call writes only at >= q0, so snapshots at <= q0
stay exact; later ones are dropped), and a call scans only from the latest snapshot. In block
decoding every step of a block then scans the block alone; each new block scans the one before
it once more. The reverse branch needs no state: in block_causal it runs inside the blocks of the
call; in bidirectional mode over [q0, L) of the cached row, the dual-cache approximation of
attention (exact only without a cache: "bidirectional decoding recomputes").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from veomni.ops.gdn import (causal_conv1d, check_gdn_impl, chunk_gated_delta_rule, reverse_segments,
                            segment_cu_seqlens)
from veomni.ops.rms_norm import rms_norm
from veomni.ops.swiglu import swiglu


class GatedRMSNorm(nn.Module):
    """RMSNorm over the head dim, then times SiLU(gate) in fp32 (HF's Qwen3_5RMSNormGated).

    `impl` is model.ops.rms_norm (set by veomni/ops/registry.py): a fused choice runs its RMSNorm
    kernel and then its SwiGLU kernel with the gate as `gate` and the normed heads as `up`
    (silu(gate) * h is exactly that product), so no fp32 copy of the heads is materialised."""

    impl: str = "eager"

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = rms_norm(x, self.weight, self.variance_epsilon, self.impl)
        if self.impl == "eager":  # HF's order: the gate product in fp32, one cast at the end
            return (h * F.silu(gate.float())).to(x.dtype)
        return swiglu(gate, h, self.impl)


@dataclass
class GDNSegments:
    """cu_seqlens over the flattened [B*S] row for the forward scan (documents) and for the
    reverse scan (None in causal mode; documents in bidirectional, documents x blocks in
    block_causal)."""

    fwd: torch.Tensor
    rev: Optional[torch.Tensor]


def gdn_segments(ctx) -> GDNSegments:
    meta = ctx.meta
    bsz, slen = meta.q_pos.shape
    if meta.q_seg is not None:  # packed rows: one document per segment id (0 = padding)
        doc = meta.q_seg.long()
    elif ctx.valid is not None:  # padding is a segment of its own, so it never starts a document
        doc = ctx.valid.long()
    else:
        doc = torch.zeros(bsz, slen, dtype=torch.long, device=meta.q_pos.device)
    fwd = segment_cu_seqlens(doc)
    if meta.mode == "causal":
        return GDNSegments(fwd, None)
    if meta.mode == "bidirectional":
        return GDNSegments(fwd, fwd)
    block = torch.div(meta.q_pos.long(), meta.block_size, rounding_mode="floor")
    # A new reverse segment wherever the document or the block changes.
    return GDNSegments(fwd, segment_cu_seqlens(doc * (int(block.max()) + 2) + block))


class GatedDeltaNet(nn.Module):
    impl: str = "torch"  # the op switch model.ops.gdn (veomni/ops/registry.py)
    # Set from outside by Ulysses sequence parallelism (veomni/distributed/sequence_parallel.py):
    # called as sequence_parallel(self, qkv, g, beta, ctx) on this rank's slice of the sequence; it
    # runs self.mix over the whole sequence on a block of the heads.
    sequence_parallel = None

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads, self.num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        if self.num_v_heads % self.num_k_heads:
            raise ValueError(f"linear_num_value_heads={self.num_v_heads} must be a multiple of "
                             f"linear_num_key_heads={self.num_k_heads}")
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.conv_kernel_size = config.linear_conv_kernel_dim
        if config.hidden_act != "silu":
            raise NotImplementedError(f"GDN: hidden_act={config.hidden_act!r}; the conv activation is SiLU only")
        h = config.hidden_size
        self.in_proj_qkv = nn.Linear(h, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(h, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(h, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(h, self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.conv_kernel_size, groups=self.conv_dim,
                                bias=False, padding=self.conv_kernel_size - 1)  # HF's module; we run the conv in ops
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads))
        self.norm = GatedRMSNorm(self.head_v_dim, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, h, bias=False)
        self.reverse_gate = nn.Parameter(torch.zeros(self.num_v_heads))  # ours: see the module docstring

    @torch.no_grad()
    def reset_dllm_parameters(self) -> None:
        """HF's init for the gates (A ~ U(0.01, 16), dt_bias = 1), the norm at 1, the reverse gate at 0;
        the projections and the conv are initialised by their own modules."""
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0.01, 16).log())
        self.dt_bias.fill_(1.0)
        self.norm.weight.fill_(1.0)
        self.reverse_gate.zero_()

    def _scan(self, qkv, g, beta, cu_seqlens, weight, nk: int, nv: int):
        """conv + SiLU, split, L2-normalised chunked delta rule over the segments of cu_seqlens, for
        nk key heads and nv value heads (all of them, or one block under sequence parallelism)."""
        impl = check_gdn_impl(self.impl)
        bsz, slen, _ = qkv.shape
        mixed = causal_conv1d(qkv, weight, cu_seqlens=cu_seqlens, activation="silu", impl=impl)
        kd = nk * self.head_k_dim
        q, k, v = mixed.split([kd, kd, nv * self.head_v_dim], dim=-1)
        q = q.reshape(bsz, slen, nk, self.head_k_dim)
        k = k.reshape(bsz, slen, nk, self.head_k_dim)
        v = v.reshape(bsz, slen, nv, self.head_v_dim)
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu_seqlens, use_qk_l2norm=True, impl=impl)
        return o

    def head_block_channels(self, block: int, num_blocks: int) -> torch.Tensor:
        """Indices of the [q | k | v] conv channels of head block `block` of `num_blocks` (key and
        value heads split alike, so each q/k head keeps its value heads)."""
        kd, vd = self.key_dim // num_blocks, self.value_dim // num_blocks
        dev = self.conv1d.weight.device
        return torch.cat([torch.arange(block * kd, (block + 1) * kd, device=dev),
                          self.key_dim + torch.arange(block * kd, (block + 1) * kd, device=dev),
                          2 * self.key_dim + torch.arange(block * vd, (block + 1) * vd, device=dev)])

    def mix(self, qkv, g, beta, ctx, heads=None) -> torch.Tensor:
        """The token mixing over the whole sequence: conv and scans -> o [B, S, heads, head_v_dim].

        qkv [B, S, conv channels], g/beta [B, S, value heads]. heads=(block, num_blocks) computes only
        that block of the heads (qkv then holds the [q | k | v] channels of head_block_channels, g/beta
        its value heads): the conv weight and the reverse gate are sliced to it."""
        weight, gate = self.conv1d.weight.squeeze(1), self.reverse_gate
        nk, nv = self.num_k_heads, self.num_v_heads
        if heads is not None:
            block, num_blocks = heads
            nk, nv = nk // num_blocks, nv // num_blocks
            weight = weight[self.head_block_channels(block, num_blocks)]
            gate = gate[block * nv:(block + 1) * nv]
        seg = ctx.remember("gdn_segments", lambda: gdn_segments(ctx))
        o = self._scan(qkv, g, beta, seg.fwd, weight, nk, nv)
        if seg.rev is not None:
            def flip(t):
                return reverse_segments(t, seg.rev)

            o_rev = flip(self._scan(flip(qkv), flip(g), flip(beta), seg.rev, weight, nk, nv))
            o = o + gate.to(o.dtype)[:, None] * o_rev
        return o

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if ctx.meta.q_clean is not None:
            # [x_t ; x_0] would run one recurrence through the noisy copy into the clean one.
            raise ValueError("two-stream block-diffusion rows (train.objective=bd3lm) cannot pass through gated "
                             "DeltaNet recurrences; train hybrids with train.objective=mdm and "
                             "model.attn_mode=block_causal instead.")
        if ctx.valid is not None:
            x = x * ctx.valid[..., None].to(x.dtype)
        bsz, slen, _ = x.shape
        qkv = self.in_proj_qkv(x)
        z = self.in_proj_z(x).view(bsz, slen, self.num_v_heads, self.head_v_dim)
        beta = self.in_proj_b(x).sigmoid()
        # fp32: with fp16/bf16 weights exp(A_log) could overflow to inf (HF's note too).
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)
        if ctx.cache is not None:
            o = self._cached(qkv, g, beta, ctx)
            return self.out_proj(self.norm(o, z).reshape(bsz, slen, self.value_dim))
        if self.sequence_parallel is None:
            o = self.mix(qkv, g, beta, ctx)
        else:
            o = self.sequence_parallel(self, qkv, g, beta, ctx)
        o = self.norm(o, z).reshape(bsz, slen, self.value_dim)
        return self.out_proj(o)

    # ---- decoding with a cache -----------------------------------------------------------------
    def _heads(self, mixed):
        bsz, slen, _ = mixed.shape
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        return (q.reshape(bsz, slen, self.num_k_heads, self.head_k_dim),
                k.reshape(bsz, slen, self.num_k_heads, self.head_k_dim),
                v.reshape(bsz, slen, self.num_v_heads, self.head_v_dim))

    def _cached(self, qkv, g, beta, ctx) -> torch.Tensor:
        impl = check_gdn_impl(self.impl)
        cache, pos = ctx.cache, ctx.cache_position
        q0, q1 = int(pos[0]), int(pos[-1]) + 1
        if q1 - q0 != pos.numel():
            raise ValueError("GDN with a cache needs contiguous cache_position (rows [q0, q1))")
        if ctx.meta.q_seg is not None:
            raise ValueError("GDN: packed rows (segment_ids) cannot be combined with a cache")
        full = cache.update_extra("gdn_in", self.layer_idx, torch.cat([qkv, beta], dim=-1), pos)
        g_all = cache.update_extra("gdn_g", self.layer_idx, g, pos)  # fp32: log decays
        qkv_all, beta_all = full.split([self.conv_dim, self.num_v_heads], dim=-1)
        weight = self.conv1d.weight.squeeze(1)
        kk = self.conv_kernel_size - 1

        states = cache.layer_states(self.layer_idx)
        for j in [j for j in states if j > q0]:  # this call rewrites rows >= q0
            del states[j]
        j0 = max(states, default=0)
        c0 = max(0, j0 - kk)  # the conv window reaches kk cached inputs back
        mixed = causal_conv1d(qkv_all[:, c0:q1], weight, activation="silu", impl=impl)[:, j0 - c0:]
        q, k, v = self._heads(mixed)
        run = lambda a, b, init: chunk_gated_delta_rule(  # noqa: E731
            q[:, a:b], k[:, a:b], v[:, a:b], g_all[:, j0 + a:j0 + b], beta_all[:, j0 + a:j0 + b],
            initial_state=init, output_final_state=True, use_qk_l2norm=True, impl=impl)
        state = states.get(j0)
        if j0 < q0:  # advance the snapshot to q0 once; later calls at q0 start there
            _, state = run(0, q0 - j0, state)
            states[q0] = state.detach()
        o, _ = run(q0 - j0, q1 - j0, state)
        if ctx.meta.mode == "causal":
            return o
        return o + self.reverse_gate.to(o.dtype)[:, None] * self._cached_reverse(qkv_all, g_all, beta_all, q0, q1,
                                                                              cache, ctx, impl)

    def _cached_reverse(self, qkv_all, g_all, beta_all, q0, q1, cache, ctx, impl):
        """Reverse-scan outputs at rows [q0, q1): they depend on rows >= each position only, up to
        the end of its block (block_causal) or of the cached row (bidirectional)."""
        end = qkv_all.shape[1]
        bsz = qkv_all.shape[0]
        valid = cache.valid[:, q0:end].long()
        if ctx.meta.mode == "block_causal":
            block = torch.div(cache.positions[:, q0:end].long(), ctx.meta.block_size, rounding_mode="floor")
            doc = valid * (int(block.max()) + 2) + block
        else:
            doc = valid
        cu = segment_cu_seqlens(doc)

        def flip(t):
            return reverse_segments(t, cu)

        mixed = causal_conv1d(flip(qkv_all[:, q0:end]), self.conv1d.weight.squeeze(1), cu_seqlens=cu,
                              activation="silu", impl=impl)
        q, k, v = self._heads(mixed)
        o, _ = chunk_gated_delta_rule(q, k, v, flip(g_all[:, q0:end]), flip(beta_all[:, q0:end]), cu_seqlens=cu,
                                      use_qk_l2norm=True, impl=impl)
        return flip(o)[:, : q1 - q0].reshape(bsz, q1 - q0, self.num_v_heads, self.head_v_dim)
