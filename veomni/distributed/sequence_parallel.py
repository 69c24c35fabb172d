"""Ulysses sequence parallelism: each rank of an `sp` group holds S/P tokens of every row; token
mixers exchange sequence shards for head shards (all-to-all), mix over the full sequence on H/P
heads, and exchange back (DeepSpeed-Ulysses; VeOmni's `ulysses_parallel_size`).

Primitives (autograd: the backward of one all-to-all is the opposite all-to-all):

    seq_to_head(x, group, seq_dim, head_dim)   [.., S/P, .., H, ..] -> [.., S, .., H/P, ..]
    head_to_seq(x, group, seq_dim, head_dim)   the inverse
    gather_seq(x, group, dim)                  [.., S/P, ..] -> [.., S, ..] (no gradient: metadata)

Rank r of the group holds tokens [r * S/P, (r + 1) * S/P) and, after seq_to_head, heads
[r * H/P, (r + 1) * H/P). H must be divisible by P (callers repeat K/V heads first when P > H_kv).

Applied from outside (`parallelize` -> `apply_sequence_parallel`): every token mixer gets a
`sequence_parallel` hook; everything else in a block (norms, MLP, MoE routing, the LM head) is
per token and runs on the local slice unchanged.
  attention      q/k/v are projected, normed and rotated locally (RoPE from the local position
                 ids), exchanged to [B, S, H/P, D] (K/V heads repeated first when P > H_kv), attended
                 under the mask of the WHOLE row (global_context), and exchanged back before o_proj.
  gated DeltaNet the projections and gates (beta, g) are local; q/k/v/beta/g are exchanged per head,
                 the conv and the forward/reverse scans run over the whole row on H/P heads with
                 this rank's slices of the conv weight and the reverse gate (VeOmni's scheme), and
                 the output comes back before the gated norm.

The batch side (trainer): the whole micro-batch is corrupted once, identically on every sp rank
(same data, same noise seed), then `shard_model_inputs` pads every per-token model input to a
multiple of P and slices it, and `shard_scored_rows` keeps the loss rows whose hidden state lies
in this rank's slice. Targets are read at their true positions before slicing (never shifted
after it), so a row at the end of one slice may predict a token held by the next rank.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split x into P chunks along scatter_dim, send chunk j to rank j, and concatenate the P
    received chunks (ordered by source rank) along gather_dim."""
    p = dist.get_world_size(group)
    if p == 1:
        return x
    if x.shape[scatter_dim] % p:
        raise ValueError(f"sequence parallel: dim {scatter_dim} of size {x.shape[scatter_dim]} is not divisible "
                         f"by the sp size {p}")
    # Chunks along scatter_dim become the leading dim so all_to_all_single exchanges whole chunks.
    chunks = x.movedim(scatter_dim, 0)
    chunks = chunks.reshape(p, chunks.shape[0] // p, *chunks.shape[1:]).contiguous()
    out = torch.empty_like(chunks)
    dist.all_to_all_single(out, chunks, group=group)
    # out[j]: rank j's shard of gather_dim, our slice of scatter_dim. Restore x's layout behind the
    # source-rank dim, put that dim right before gather_dim and merge the two (rank-major order).
    out = out.movedim(1, scatter_dim + 1).movedim(0, gather_dim)
    shape = list(out.shape)
    return out.reshape(shape[:gather_dim] + [shape[gather_dim] * shape[gather_dim + 1]] + shape[gather_dim + 2:])


class _SeqAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.group, gather_dim, scatter_dim), None, None, None


def _norm_dim(d: int, ndim: int) -> int:
    return d % ndim


def seq_to_head(x: torch.Tensor, group, seq_dim: int, head_dim: int) -> torch.Tensor:
    """[.., S/P, .., H, ..] -> [.., S, .., H/P, ..]: gather the sequence, scatter the heads."""
    return _SeqAllToAll.apply(x, group, _norm_dim(head_dim, x.dim()), _norm_dim(seq_dim, x.dim()))


def head_to_seq(x: torch.Tensor, group, seq_dim: int, head_dim: int) -> torch.Tensor:
    """[.., S, .., H/P, ..] -> [.., S/P, .., H, ..]: the inverse of seq_to_head."""
    return _SeqAllToAll.apply(x, group, _norm_dim(seq_dim, x.dim()), _norm_dim(head_dim, x.dim()))


@torch.no_grad()
def gather_seq(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Concatenate every rank's shard along `dim` (rank order); metadata only, no gradient."""
    p = dist.get_world_size(group)
    if p == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(p)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def global_context(ctx, group):
    """A copy of the LayerContext `ctx` (built by DecoderModel from this rank's S/P tokens) whose
    `meta` and `valid` describe the whole sequence: position ids, segment ids and key padding are
    gathered from the sp ranks, row indices are 0..S-1. Built once per forward (ctx.memo).

    Segment ids (and so cu_seqlens / GDN document boundaries) therefore come from the global
    position/segment ids before slicing, never from a rank's shard alone."""
    def build():
        from veomni.ops.attention import AttnMeta

        meta = ctx.meta
        if ctx.cache is not None:
            raise ValueError("sequence parallelism is a training feature: it cannot be combined with a KV cache")
        pos = gather_seq(meta.q_pos, group, 1)
        seg = None if meta.q_seg is None else gather_seq(meta.q_seg, group, 1)
        k_valid = None if meta.k_valid is None else gather_seq(meta.k_valid, group, 1)
        valid = None if ctx.valid is None else gather_seq(ctx.valid, group, 1)
        clean = None if meta.q_clean is None else gather_seq(meta.q_clean, group, 1)
        idx = torch.arange(pos.shape[1], device=pos.device)
        gmeta = AttnMeta(mode=meta.mode, block_size=meta.block_size, q_idx=idx, k_idx=idx, q_pos=pos, k_pos=pos,
                         k_valid=k_valid, q_seg=seg, k_seg=seg, q_clean=clean, k_clean=clean)
        return dataclasses.replace(ctx, meta=gmeta, valid=valid, memo={})

    return ctx.remember("sp_global_context", build)


# ------------------------------------------------------------------------------- mixer hooks
class UlyssesAttention:
    """Attention.sequence_parallel: attend over the whole row on this rank's block of heads."""

    def __init__(self, group, sp_size: int, num_heads: int, num_kv_heads: int, where: str = "attention"):
        if num_heads % sp_size:
            raise ValueError(f"{where}: num_attention_heads={num_heads} is not divisible by "
                             f"train.ulysses_parallel_size={sp_size}; choose an sp size that divides it.")
        if num_kv_heads % sp_size and sp_size % num_kv_heads:
            raise ValueError(f"{where}: num_key_value_heads={num_kv_heads} and train.ulysses_parallel_size="
                             f"{sp_size}: one must divide the other (K/V heads are split, or repeated when the "
                             "sp size is larger).")
        self.group, self.sp_size = group, sp_size
        # P > H_kv: repeat each K/V head P / H_kv times so every rank gets the one its queries use
        # (rank r holds query heads [r H/P, (r+1) H/P), which all read original K/V head r H_kv / P).
        self.kv_repeat = 1 if num_kv_heads % sp_size == 0 else sp_size // num_kv_heads

    def __call__(self, module, q, k, v, ctx):
        if self.kv_repeat > 1:
            k, v = k.repeat_interleave(self.kv_repeat, dim=1), v.repeat_interleave(self.kv_repeat, dim=1)
        q, k, v = (seq_to_head(t, self.group, seq_dim=2, head_dim=1) for t in (q, k, v))
        out = module.attend(q, k, v, global_context(ctx, self.group))
        return head_to_seq(out, self.group, seq_dim=2, head_dim=1)


class UlyssesGDN:
    """GatedDeltaNet.sequence_parallel: conv + scans over the whole row on this rank's heads."""

    def __init__(self, group, sp_size: int, sp_rank: int, module, where: str = "linear_attn"):
        for name in ("num_k_heads", "num_v_heads"):
            n = getattr(module, name)
            if n % sp_size:
                raise ValueError(f"{where}: {name}={n} is not divisible by train.ulysses_parallel_size={sp_size}; "
                                 "gated DeltaNet splits its key and value heads over the sp ranks.")
        self.group, self.sp_size, self.sp_rank = group, sp_size, sp_rank

    def __call__(self, module, qkv, g, beta, ctx):
        bsz, slen, _ = qkv.shape
        q, k, v = qkv.split([module.key_dim, module.key_dim, module.value_dim], dim=-1)
        heads = [q.reshape(bsz, slen, module.num_k_heads, module.head_k_dim),
                 k.reshape(bsz, slen, module.num_k_heads, module.head_k_dim),
                 v.reshape(bsz, slen, module.num_v_heads, module.head_v_dim), g, beta]
        q, k, v, g, beta = (seq_to_head(t, self.group, seq_dim=1, head_dim=2) for t in heads)
        qkv = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)  # head_block_channels order
        o = module.mix(qkv, g, beta, global_context(ctx, self.group), heads=(self.sp_rank, self.sp_size))
        return head_to_seq(o, self.group, seq_dim=1, head_dim=2)


def apply_sequence_parallel(model: nn.Module, ps) -> int:
    """Install the Ulysses hook on every token mixer of the model's decoder blocks; returns how many.
    A mixer of an unknown kind is an error (it would silently mix only the local slice)."""
    from veomni.models.transformers.dense_decoder import Attention
    from veomni.models.transformers.gated_deltanet import GatedDeltaNet

    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no .model.layers: sequence parallelism needs the decoder layout")
    group, size, rank = ps.group("sp"), ps.sp_size, ps.sp_rank
    for i, layer in enumerate(layers):
        mixer = getattr(layer, "mixer", None)
        where = f"layer {i} ({type(mixer).__name__})"
        if isinstance(mixer, Attention):
            mixer.sequence_parallel = UlyssesAttention(group, size, mixer.num_heads, mixer.num_kv_heads, where)
        elif isinstance(mixer, GatedDeltaNet):
            mixer.sequence_parallel = UlyssesGDN(group, size, rank, mixer, where)
        else:
            raise NotImplementedError(f"sequence parallelism: {where} has no Ulysses implementation; "
                                      "use train.ulysses_parallel_size=1 for this model.")
    return len(layers)


# ------------------------------------------------------------------------------- the batch side
# Per-token model inputs and the value that fills the padding up to a multiple of P (padding is
# invisible: attention_mask 0 and segment 0 keep it out of every mask, scan and router statistic).
_PAD = {"input_ids": 0, "position_ids": 0, "segment_ids": 0, "attention_mask": 0, "clean_stream": False}


def local_span(seq_len: int, sp_size: int, sp_rank: int) -> Tuple[int, int]:
    """[lo, hi) of this rank's slice of a row of seq_len tokens padded to a multiple of sp_size."""
    n = -(-seq_len // sp_size)
    return sp_rank * n, (sp_rank + 1) * n


def shard_model_inputs(inputs: Dict, sp_size: int, sp_rank: int) -> Dict:
    """Pad every per-token tensor of a model call to a multiple of sp_size and keep this rank's
    slice. Non-tensor arguments (attn_mode, block_size) pass through; an unknown tensor argument is
    an error, never silently left whole."""
    ids = inputs["input_ids"]
    lo, hi = local_span(ids.shape[1], sp_size, sp_rank)
    if (hi - lo) * sp_size > ids.shape[1] and inputs.get("attention_mask") is None:
        # The padding must be masked out of every other token's view.
        inputs = {**inputs, "attention_mask": torch.ones_like(ids)}
    out = {}
    for key, value in inputs.items():
        if not isinstance(value, torch.Tensor):
            out[key] = value
            continue
        if key not in _PAD:
            raise KeyError(f"shard_model_inputs: no sequence-parallel rule for model input {key!r} "
                           f"(known: {sorted(_PAD)}); add one to veomni/distributed/sequence_parallel.py")
        seq_len = value.shape[1]
        lo, hi = local_span(seq_len, sp_size, sp_rank)
        if hi > seq_len:
            value = torch.cat([value, value.new_full((value.shape[0], hi - seq_len), _PAD[key])], dim=1)
        out[key] = value[:, lo:hi]
    return out


def shard_scored_rows(rows, seq_len: int, sp_size: int, sp_rank: int):
    """The loss rows (veomni.diffusion.objective.ScoredRows) whose hidden state is in this rank's
    slice, with positions made local: every per-row tensor (target, weight) is selected alike."""
    lo, hi = local_span(seq_len, sp_size, sp_rank)
    col = rows.positions[:, 1]
    keep = (col >= lo) & (col < hi)
    positions = rows.positions[keep].clone()
    positions[:, 1] -= lo
    return dataclasses.replace(rows, positions=positions, targets=rows.targets[keep],
                               weights=rows.weights[keep], shape=(rows.shape[0], hi - lo))


# ------------------------------------------------------------------------------- MoE statistics
class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the gradient of every rank's input is the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def reduce_router_stats(stats: List, group) -> List:
    """Router statistics of the whole rows: each sp rank routed only its slice, but the balance loss
    is a product of means over the micro-batch, so the sums are pooled over the sp group first
    (differentiably: every rank then computes the micro-batch's loss, and the trainer takes 1/P of it
    on each rank)."""
    out = []
    for s in stats:
        counts, n = s.counts.clone(), s.n_tokens.clone()
        dist.all_reduce(counts, group=group)
        dist.all_reduce(n, group=group)
        out.append(dataclasses.replace(s, counts=counts, n_tokens=n, prob_sum=_AllReduceSum.apply(s.prob_sum, group),
                                       z_sum=_AllReduceSum.apply(s.z_sum, group)))
    return out


def sp_shard(inputs: Dict, rows, ps) -> Tuple[Dict, Optional[object]]:
    """(model inputs, scored rows) of this rank under ps's sequence parallelism (unchanged at sp 1)."""
    if ps.sp_size == 1:
        return inputs, rows
    seq_len = inputs["input_ids"].shape[1]
    return (shard_model_inputs(inputs, ps.sp_size, ps.sp_rank),
            None if rows is None else shard_scored_rows(rows, seq_len, ps.sp_size, ps.sp_rank))
