"""The Repr-Align part of a training step (veomni/diffusion/repr_align.py has the method):

    align = AlignTerms.build(args, model_config, ps)     # None when train.repr_align_weight is 0
    n = align.start_step(micro, corrs, step)           # plans; n = this rank's (row, layer) pairs
    ... global_pairs = all_reduce(n) (with the CE denominators) ...
    term = align.add(i, hidden_states, global_pairs)   # per micro-batch, added before backward
    metrics = align.metrics(all_reduce(align.local_sum()), global_pairs)

The teacher (the frozen AR model, loaded from train.align_teacher_path or the starting checkpoint)
or the anchor cache lives here, never in the trainer's model: it is not in the student's state dict,
optimizer or checkpoints.
"""
from __future__ import annotations

import logging
from typing import List, Optional

import torch

logger = logging.getLogger("veomni")


class AlignTerms:
    def __init__(self, align, seed: int, dp_rank: int, dp_size: int):
        self.align = align
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.plans: List = []
        self._raw = None

    @classmethod
    def build(cls, args, model, ps) -> Optional["AlignTerms"]:
        t = args.train
        if not t.repr_align_weight:
            for key in ("align_layers", "align_teacher_path", "align_cache_dir"):
                if getattr(t, key):
                    raise ValueError(f"train.{key} is set but train.repr_align_weight is 0: set a weight (the "
                                     "paper uses 10) or remove it")
            return None
        if ps.sp_size > 1 or ps.ep_size > 1:
            raise ValueError("train.repr_align_weight > 0 does not compose with sequence or expert parallelism yet "
                             "(the teacher would need the same sharding); use ulysses/expert_parallel_size=1")
        from veomni.diffusion.repr_align import AnchorCache, ReprAlign

        teacher_path = t.align_teacher_path or args.model.require_model_path()
        n_states = model.config.num_hidden_layers + 1
        kwargs = dict(weight=t.repr_align_weight, layers=t.align_layers, num_hidden_states=n_states,
                      token_fraction=t.align_token_fraction, layer_fraction=t.align_layer_fraction)
        if t.align_cache_dir:
            cache = AnchorCache(t.align_cache_dir)
            align = ReprAlign(cache=cache, **kwargs)
            cache.check(teacher_path, align.layers, args.data.max_seq_len, n_states)
            source = f"anchor cache {t.align_cache_dir}"
        else:
            align = ReprAlign(teacher=cls._teacher(teacher_path, args, ps), **kwargs)
            source = f"frozen teacher {teacher_path}"
        logger.info("Repr-Align: weight %g on %d of %d hidden states (token fraction %g, layer fraction %g), %s",
                    t.repr_align_weight, len(align.layers), n_states, t.align_token_fraction,
                    t.align_layer_fraction, source)
        return cls(align, t.seed, ps.dp_rank, ps.dp_size)

    @staticmethod
    def _teacher(path, args, ps):
        from veomni.models.hf_io import load_model

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.model.dtype]
        teacher = load_model(path, dtype=dtype, attn_impl=args.model.attn_impl).to(ps.device)
        if ps.dp_mode == "fsdp2" and ps.world_size > 1:
            # Sharded like the student (its parameters are frozen: FSDP only gathers them per block).
            from torch.distributed.fsdp import fully_shard

            for block in teacher.model.layers:
                fully_shard(block, mesh=ps.fsdp_mesh())
            fully_shard(teacher, mesh=ps.fsdp_mesh())
        return teacher

    def start_step(self, micro: list, corrs: list, step: int) -> int:
        """Plan every micro-batch of the step; returns this rank's (row, layer) pair count. The
        subsampling generator is keyed like the noise, on stream 1: (seed, step, 1, global micro)."""
        from veomni.diffusion.noise import make_generator

        self.plans = [self.align.plan(mb, corr, make_generator(self.seed, step, 1, i * self.dp_size + self.dp_rank))
                      for i, (mb, corr) in enumerate(zip(micro, corrs))]
        self._raw = None
        return sum(self.align.num_pairs(p) for p in self.plans)

    def add(self, index: int, hidden_states: list, global_pairs: float) -> torch.Tensor:
        term, raw = self.align.loss(hidden_states, self.plans[index], global_pairs)
        self._raw = raw if self._raw is None else self._raw + raw
        return term

    def local_sum(self) -> torch.Tensor:
        return self._raw.reshape(1).float()

    @staticmethod
    def metrics(reduced: torch.Tensor, global_pairs: float) -> dict:
        """align_loss: the step's mean (1 - cos) over all (row, layer) pairs, unweighted."""
        return {"align_loss": float(reduced[0]) / max(global_pairs, 1.0)}
