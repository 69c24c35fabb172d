"""Expert parallelism: experts split over the `ep` mesh, tokens moved to them by all-to-all.

Applied from outside by `parallelize` (the model code only offers `Experts.dispatcher`):

  apply_expert_parallel(model, ps)
      every Experts module keeps the block of E / ep experts of its EP rank, as a DTensor
      Shard(0) over ps.submesh("ep") (so checkpoints see the global [E, ...] tensor and reshard
      to any EP size), and gets an `AllToAllDispatcher`.
  FSDP2 (parallelism.apply_fsdp2) then shards each Experts module over "ep_fsdp" and the rest of
      the model over all ranks.

One MoE forward on an EP rank (dropless: no capacity, nothing is dropped; the host learns the
split sizes once per layer, which variable-size all-to-all needs):
  1. sort this rank's (token, slot) pairs by global expert: experts are contiguous per EP rank,
     so the sorted rows are already grouped by destination rank;
  2. exchange the per-expert counts (all-to-all of E integers);
  3. all-to-all the rows (autograd: backward sends the gradients back along reversed splits);
  4. the received rows come ordered (source rank, local expert); reorder to (local expert,
     source rank) and run the local experts (Experts.ffn: the loop or grouped op);
  5. undo 4, all-to-all back, weight by the router and scatter-add into the token rows.

Gradient scale: every rank's loss is multiplied by dp_size (= world size) before backward, which
FSDP's default averaging undoes for parameters every rank holds. An expert's gradient already
sums the tokens of its whole EP group (the all-to-all brought them), and FSDP then averages it
over ep_fsdp only (world / ep ranks), so it would come out ep times too large. The expert weights
therefore enter the expert compute through `scale_grad(w, 1 / ep)`. (FSDP2's
set_gradient_divide_factor would do the same with one number, but it needs ReduceOp.PREMUL_SUM,
which gloo lacks: "Cannot use ReduceOp.PREMUL_SUM with Gloo".)
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
import torch.nn as nn

from veomni.ops.moe_experts import sort_by_expert


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; backward runs it with the splits swapped."""

    @staticmethod
    def forward(ctx, x, out_splits: List[int], in_splits: List[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: List[int], in_splits: List[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


class AllToAllDispatcher:
    """Routes an Experts module's tokens to the EP ranks that own their experts, and back."""

    def __init__(self, group, ep_size: int, num_experts: int):
        self.group, self.ep_size, self.num_experts = group, ep_size, num_experts
        self.local_experts = num_experts // ep_size

    def __call__(self, experts: nn.Module, x: torch.Tensor, top_idx: torch.Tensor,
                 top_w: torch.Tensor) -> torch.Tensor:
        ep, n_local = self.ep_size, self.local_experts
        tok, order, counts = sort_by_expert(top_idx, self.num_experts)  # 1.
        send = counts.view(ep, n_local)
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)  # 2. recv[s * n_local + e]
        recv = recv.view(ep, n_local)
        in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        rows = all_to_all(x[tok], out_splits, in_splits, self.group)  # 3.
        chunk = torch.repeat_interleave(torch.arange(ep * n_local, device=x.device), recv.reshape(-1))
        by_expert = torch.argsort((chunk % n_local) * ep + chunk // n_local, stable=True)  # 4.
        y = experts.ffn(rows[by_expert], recv.sum(0), grad_scale=1.0 / ep)
        y = y[torch.argsort(by_expert)]  # 5.
        y = all_to_all(y, in_splits, out_splits, self.group)
        y = y * top_w.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, tok, y.to(x.dtype))


def expert_modules(model: nn.Module):
    from veomni.models.transformers.moe import Experts

    return [m for m in model.modules() if isinstance(m, Experts)]


def apply_expert_parallel(model: nn.Module, ps) -> int:
    """Keep this EP rank's experts (DTensor Shard(0) over "ep") and install the dispatcher.

    Returns the number of Experts modules converted; a model without any is an error (EP asked
    for on a dense model would otherwise be a silent no-op)."""
    from torch.distributed.tensor import DTensor, Shard

    mods = expert_modules(model)
    if not mods:
        raise ValueError(f"train.expert_parallel_size={ps.ep_size} but {type(model).__name__} has no "
                         "mixture-of-experts layers; use expert_parallel_size=1 for dense models.")
    mesh = ps.submesh("ep")
    for m in mods:
        if m.num_experts % ps.ep_size:
            raise ValueError(f"num_experts={m.num_experts} is not divisible by train.expert_parallel_size="
                             f"{ps.ep_size}; every EP rank must own the same number of experts.")
        n = m.num_experts // ps.ep_size
        lo = ps.ep_rank * n
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(m, name)
            # from_local: each rank slices its own (identical) copy; nothing is sent. A meta model
            # (sharded loading, veomni/models/sharded_load.py) stays on meta: it has no data to copy.
            local = full.detach()[lo:lo + n]
            local = local if local.is_meta else local.to(ps.device).clone()
            setattr(m, name, nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False),
                                          requires_grad=full.requires_grad))
        m.dispatcher = AllToAllDispatcher(mesh.get_group(), ps.ep_size, m.num_experts)
    return len(mods)
