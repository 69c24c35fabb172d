"""Sparse mixture-of-experts MLP (Qwen3-MoE, Qwen2-MoE), single device, plain torch.

    SparseMoeBlock
      gate           TopKRouter: logits = x W^T, softmax in fp32, top-k (renormalised iff
                     config.norm_topk_prob), weights cast back to the logits' dtype
      experts        Experts: fused weights gate_up_proj [E, 2I, H], down_proj [E, H, I]
      shared_expert  (Qwen2-MoE) a dense SwiGLU on every token, scaled by sigmoid(shared_expert_gate(x))

Parameter names and layouts equal transformers v5's in-memory ones; per-expert hub checkpoints
(`experts.{j}.gate_proj.weight`, ...) are converted by veomni/models/moe_weights.py.

Routing is dropless: every token reaches its k experts (no capacity factor). The router sees
every non-padding token, masked and clean alike: in masked diffusion the mask token is one more
input the router learns to place. Padding is routed too (the shapes stay static) but is left out
of the balance statistics, as transformers' `load_balancing_loss_func` does with attention_mask.

Expert compute goes through veomni/ops/moe_experts.py (`impl`: loop | grouped). Expert
parallelism sets `Experts.dispatcher` from outside (veomni/distributed/expert_parallel.py); the
model code never looks at ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from veomni.ops.moe_experts import EXPERT_FORWARD, check_experts_impl, expert_ffn


@dataclass
class RouterStats:
    """Sufficient statistics of one MoE layer's routing over the valid (non-padding) tokens.

    counts:   [E] top-k assignments per expert (no gradient)
    prob_sum: [E] sum of the softmax router probabilities per expert (carries the gradient)
    z_sum:    sum of logsumexp(router logits)^2 (router z-loss, ST-MoE)
    n_tokens: number of valid tokens
    The balance loss of transformers pools these over layers (veomni/diffusion/router_loss.py).
    """

    counts: torch.Tensor
    prob_sum: torch.Tensor
    z_sum: torch.Tensor
    n_tokens: torch.Tensor


def router_stats(logits: torch.Tensor, probs: torch.Tensor, top_idx: torch.Tensor,
                 valid: Optional[torch.Tensor]) -> RouterStats:
    """logits/probs [T, E], top_idx [T, k], valid [T] bool or None (all valid)."""
    num_experts = logits.shape[-1]
    w = None if valid is None else valid.reshape(-1).to(probs.dtype)
    with torch.no_grad():
        hits = F.one_hot(top_idx, num_experts).sum(1).to(torch.float32)  # [T, E]
        counts = (hits if w is None else hits * w[:, None]).sum(0)
        n = torch.tensor(float(logits.shape[0]), device=logits.device) if w is None else w.sum()
    z = torch.logsumexp(logits.float(), dim=-1).pow(2)
    prob_sum = (probs if w is None else probs * w[:, None]).sum(0)
    z_sum = (z if w is None else z * w).sum()
    return RouterStats(counts, prob_sum, z_sum, n)


class TopKRouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        # Qwen3.5-MoE has no such field: it always renormalises (transformers' Qwen3_5MoeTopKRouter).
        self.norm_topk_prob = bool(getattr(config, "norm_topk_prob", True))
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} must be in [1, num_experts={self.num_experts}]")
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size))

    def forward(self, x: torch.Tensor):
        """x [T, H] -> (logits [T, E], probs fp32 [T, E], top_w [T, k], top_idx [T, k])."""
        logits = F.linear(x, self.weight)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        top_w, top_idx = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return logits, probs, top_w.to(logits.dtype), top_idx


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in forward; multiplies the gradient by `scale` in backward."""
    return _ScaleGrad.apply(x, scale)


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """This rank's block of a parameter (a DTensor under expert parallelism; plain otherwise)."""
    return p.to_local() if hasattr(p, "to_local") else p


class Experts(nn.Module):
    """E SwiGLU experts in fused tensors. `impl` is model.ops.moe_experts, `act_impl` model.ops.swiglu
    (both set by veomni/ops/registry.py); `dispatcher` is set by EP."""

    impl: str = "grouped"
    act_impl: str = "eager"

    def __init__(self, config, act):
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = e
        self.top_k = config.num_experts_per_tok
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.act = act
        self.dispatcher = None  # expert parallelism: routes tokens to the rank owning each expert

    def ffn(self, x_sorted: torch.Tensor, counts: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
        """Rows of x_sorted grouped by this module's (local) experts, counts[e] rows each.
        grad_scale multiplies the weights' gradients only (expert parallelism needs 1/ep)."""
        gate_up, down = local_tensor(self.gate_up_proj), local_tensor(self.down_proj)
        if grad_scale != 1.0:
            gate_up, down = scale_grad(gate_up, grad_scale), scale_grad(down, grad_scale)
        return expert_ffn(x_sorted, counts, gate_up, down, self.act, check_experts_impl(self.impl), self.act_impl)

    def forward(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        if self.dispatcher is not None:
            return self.dispatcher(self, x, top_idx, top_w)
        return EXPERT_FORWARD[check_experts_impl(self.impl)](x, top_idx, top_w, self.gate_up_proj,
                                                             self.down_proj, self.act, self.act_impl)


class SparseMoeBlock(nn.Module):
    def __init__(self, config, act, shared_mlp: Optional[nn.Module] = None):
        super().__init__()
        self.gate = TopKRouter(config)
        self.experts = Experts(config, act)
        if shared_mlp is not None:  # Qwen2-MoE
            self.shared_expert = shared_mlp
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.has_shared = shared_mlp is not None

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None):
        """x [B, S, H], valid [B, S] (False = padding) -> (out [B, S, H], RouterStats)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, probs, top_w, top_idx = self.gate(flat)
        out = self.experts(flat, top_idx, top_w)
        if self.has_shared:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.reshape(shape), router_stats(logits, probs, top_idx, valid)


def is_sparse_layer(config, layer_idx: int) -> bool:
    """transformers' rule: sparse unless listed in mlp_only_layers, every decoder_sparse_step-th."""
    return (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
            and config.num_experts > 0 and (layer_idx + 1) % getattr(config, "decoder_sparse_step", 1) == 0)
