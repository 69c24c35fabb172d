"""The mixture-of-experts part of a training step: router losses into the loss, router metrics out.

    moe = MoETerms.build(args.train, model)        # None for a dense model
    moe.start_step(global_tokens)                  # valid tokens of the step, all ranks + micro-batches
    term = moe.add(out.router_stats)               # per micro-batch: add to its loss before backward
    metrics = moe.metrics(all_reduce(moe.local_sums()))

The loss term of a micro-batch is `RouterLoss(aux, z)(stats, E, global_tokens)`
(veomni/diffusion/router_loss.py): each router loss of the micro-batch weighted by its share of the
step's valid tokens, so the terms of all micro-batches and ranks add up to the token-weighted mean,
whatever the world size and accumulation split. The trainer backwards `(CE share + term) * dp_size`
like the CE share alone (DDP/FSDP average gradients over ranks).

Metrics (docs/training.md, "MoE runs"): `moe_aux_loss` / `moe_z_loss`, the token-weighted means
over micro-batches and ranks of the unweighted losses (logged even when their coefficient is 0), and
the expert load: the top-k assignments per expert summed over the step (all ranks), per sparse layer
as max/mean (1 = perfectly balanced, E/k = every token on the same k experts).
"""
from __future__ import annotations

import logging
from typing import List, Optional

import torch

logger = logging.getLogger("veomni")


def sparse_blocks(model) -> list:
    from veomni.models.transformers.moe import SparseMoeBlock

    return [m for m in model.modules() if isinstance(m, SparseMoeBlock)]


class MoETerms:
    def __init__(self, aux_coef: float, z_coef: float, num_experts: int, num_layers: int, top_k: int,
                 sp_group=None, sp_size: int = 1, sp_rank: int = 0):
        from veomni.diffusion.router_loss import RouterLoss

        self.loss = RouterLoss(aux_coef=aux_coef, z_coef=z_coef)
        # Sequence parallelism: each sp rank routes its slice of the same rows (see add()).
        self.sp_group, self.sp_size, self.sp_rank = sp_group, sp_size, sp_rank
        self.num_experts = num_experts
        self.num_layers = num_layers
        self.top_k = top_k
        self.global_tokens = None
        self._sums = None  # [aux * n, z * n] over this rank's micro-batches
        self._counts = None  # [layers, E] top-k assignments over this rank's micro-batches

    @classmethod
    def build(cls, train_args, model, ps=None) -> Optional["MoETerms"]:
        """MoETerms for a MoE model, None for a dense one; router coefficients set on a dense model
        are an error (they would do nothing, silently)."""
        blocks = sparse_blocks(model)
        aux, z = train_args.router_aux_loss_coef, train_args.router_z_loss_coef
        if not blocks:
            if aux is not None or z:
                raise ValueError(
                    f"train.router_aux_loss_coef={aux} / train.router_z_loss_coef={z}: the model "
                    f"({model.config.model_type}) has no mixture-of-experts layer, so there is no router "
                    "to regularise; remove them (dense models need neither).")
            return None
        source = "train.router_aux_loss_coef"
        if aux is None:  # the model's own recipe, as HF's *ForCausalLM would use it
            aux = float(getattr(model.config, "router_aux_loss_coef", None) or 0.0)
            source = "the model config's router_aux_loss_coef"
        cfg = model.config
        logger.info("MoE: %d sparse layers x %d experts, top-%d; router aux loss coef %g (%s), z-loss coef %g",
                    len(blocks), cfg.num_experts, cfg.num_experts_per_tok, aux, source, z)
        sp = {} if ps is None or ps.sp_size == 1 else dict(sp_group=ps.group("sp"), sp_size=ps.sp_size,
                                                             sp_rank=ps.sp_rank)
        return cls(aux, z, cfg.num_experts, len(blocks), cfg.num_experts_per_tok, **sp)

    def start_step(self, global_tokens: float) -> None:
        self.global_tokens = float(global_tokens)
        self._sums = None
        self._counts = None

    def add(self, stats: List) -> Optional[torch.Tensor]:
        """Record one micro-batch's RouterStats; return the term to add to its loss (None when both
        coefficients are 0: the backward graph is then exactly the CE one)."""
        if len(stats) != self.num_layers:
            raise RuntimeError(f"the model returned RouterStats of {len(stats)} layers, expected {self.num_layers}")
        if self.sp_size > 1:
            # The balance loss of the micro-batch needs the statistics of whole rows: pool the sp
            # ranks' slices (differentiably), then each rank adds 1/P of the micro-batch's term, so
            # the ranks' terms and gradients add up to the one-process ones.
            from veomni.distributed.sequence_parallel import reduce_router_stats

            stats = reduce_router_stats(stats, self.sp_group)
        term, parts = self.loss(stats, self.num_experts, self.global_tokens)
        if self.sp_size > 1:
            term = term / self.sp_size
        with torch.no_grad():
            n = sum(s.n_tokens for s in stats) / len(stats)  # this micro-batch's valid tokens
            sums = torch.stack([parts["aux"] * n, parts["z"] * n]).float()
            counts = torch.stack([s.counts for s in stats]).float()
            if self.sp_rank != 0:  # every sp rank holds the pooled numbers: count them once
                sums, counts = torch.zeros_like(sums), torch.zeros_like(counts)
            self._sums = sums if self._sums is None else self._sums + sums
            self._counts = counts if self._counts is None else self._counts + counts
        return term if (self.loss.aux_coef or self.loss.z_coef) else None

    def local_sums(self) -> torch.Tensor:
        """This rank's [aux*n, z*n, counts...] (flat fp32), to be summed over all ranks ('world')."""
        if self._sums is None:
            raise RuntimeError("MoETerms.local_sums before any micro-batch was added")
        return torch.cat([self._sums, self._counts.reshape(-1)])

    def metrics(self, reduced: torch.Tensor) -> dict:
        """The step's router metrics from the all-reduced `local_sums()`."""
        reduced = reduced.detach().double().cpu()
        n = max(self.global_tokens, 1.0)
        counts = reduced[2:].reshape(self.num_layers, self.num_experts)
        mean = counts.mean(dim=1)
        ratio = torch.where(mean > 0, counts.max(dim=1).values / mean.clamp(min=1e-12), torch.zeros_like(mean))
        load = [round(float(r), 4) for r in ratio]
        return {"moe_aux_loss": float(reduced[0]) / n, "moe_z_loss": float(reduced[1]) / n,
                "expert_load_max": max(load), "expert_load_mean": round(sum(load) / len(load), 4),
                "expert_load": load}
