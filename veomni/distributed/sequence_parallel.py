"""Ulysses sequence parallelism: each rank of an `sp` group holds S/P tokens of every row; token
mixers exchange sequence shards for head shards (all-to-all), mix over the full sequence on H/P
heads, and exchange back (DeepSpeed-Ulysses; VeOmni's `ulysses_parallel_size`).

Primitives (autograd: the backward of one all-to-all is the opposite all-to-all):

    seq_to_head(x, group, seq_dim, head_dim)   [.., S/P, .., H, ..] -> [.., S, .., H/P, ..]
    head_to_seq(x, group, seq_dim, head_dim)   the inverse
    gather_seq(x, group, dim)                  [.., S/P, ..] -> [.., S, ..] (no gradient: metadata)

Rank r of the group holds tokens [r * S/P, (r + 1) * S/P) and, after seq_to_head, heads
[r * H/P, (r + 1) * H/P). H must be divisible by P (callers repeat K/V heads first when P > H_kv).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


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
        import dataclasses

        from veomni.ops.attention import AttnMeta

        meta = ctx.meta
        if ctx.cache is not None:
            raise ValueError("sequence parallelism is a training feature: it cannot be combined with a KV cache")
        pos = gather_seq(meta.q_pos, group, 1)
        seg = None if meta.q_seg is None else gather_seq(meta.q_seg, group, 1)
        k_valid = None if meta.k_valid is None else gather_seq(meta.k_valid, group, 1)
        valid = None if ctx.valid is None else gather_seq(ctx.valid, group, 1)
        idx = torch.arange(pos.shape[1], device=pos.device)
        gmeta = AttnMeta(mode=meta.mode, block_size=meta.block_size, q_idx=idx, k_idx=idx, q_pos=pos, k_pos=pos,
                         k_valid=k_valid, q_seg=seg, k_seg=seg)
        return dataclasses.replace(ctx, meta=gmeta, valid=valid, memo={})

    return ctx.remember("sp_global_context", build)
