"""Router regularisers of mixture-of-experts models: the balance loss and the z-loss.

Both are computed from the per-layer `RouterStats` a MoE forward returns
(veomni/models/transformers/moe.py), which hold sums over the valid tokens only, so nothing of
size tokens x experts is kept per layer.

  load_balancing_loss  Switch Transformer's E * sum_e f_e * P_e, with f_e the fraction of top-k
                       assignments and P_e the mean router probability of expert e, both pooled
                       over all sparse layers: transformers' `load_balancing_loss_func` exactly
                       (tests/models/test_moe_models.py::test_balance_loss_matches_hf compares them).
  z_loss               ST-MoE's mean over tokens (and layers) of logsumexp(router logits)^2.

Normalisation across micro-batches and ranks (`RouterLoss.__call__`): the CE loss of a micro-batch
is divided by the *global* token count, so the summed gradients equal one big batch's. The z-loss
is a token mean, so it gets the same treatment exactly. The balance loss is a product of two
means and cannot be split over micro-batches; each micro-batch's value is weighted by its share of
the global valid tokens, i.e. the step's balance loss is the token-weighted mean of the
micro-batches' ones. This is the same on any world size and accumulation split (one process with
two micro-batches = two processes with one each).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch


def load_balancing_loss(stats: Sequence, num_experts: int) -> torch.Tensor:
    n = sum(s.n_tokens for s in stats).clamp(min=1)
    counts = sum(s.counts for s in stats)
    probs = sum(s.prob_sum for s in stats)
    return num_experts * torch.sum((counts / n) * (probs / n))


def z_loss(stats: Sequence) -> torch.Tensor:
    return sum(s.z_sum for s in stats) / sum(s.n_tokens for s in stats).clamp(min=1)


def expert_load(stats: Sequence) -> List[Dict[str, float]]:
    """Per sparse layer: max and mean tokens per expert (max/mean = 1 is perfect balance)."""
    out = []
    for s in stats:
        c = s.counts.detach().float()
        out.append({"max": float(c.max()), "mean": float(c.mean())})
    return out


@dataclass
class RouterLoss:
    aux_coef: float = 0.0
    z_coef: float = 0.0

    def __call__(self, stats: Sequence, num_experts: int, global_tokens: float):
        """(term to add to this micro-batch's loss, {'aux': value, 'z': value} unweighted).

        global_tokens: valid (non-padding) tokens of the whole step, all ranks and micro-batches.
        """
        local = sum(s.n_tokens for s in stats) / len(stats)  # valid tokens of this micro-batch
        share = local / max(float(global_tokens), 1.0)
        aux = load_balancing_loss(stats, num_experts)
        z = z_loss(stats)
        term = self.aux_coef * aux * share + self.z_coef * z * share
        return term, {"aux": aux.detach(), "z": z.detach()}
