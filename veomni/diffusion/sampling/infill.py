"""Infilling: prefix + n_middle masks + suffix, decoded with any sampler; returns the middle.

The middle has a fixed length: pass the true length (oracle-length evaluation) or a fixed guess
(fixed-length evaluation; averaging over several lengths is the evaluator's job). DreamOn's
[expand]/[delete] tokens for variable-length middles are not supported. EOS is not special here:
no early stop and no trimming, since the middle is followed by the suffix.
Batches: prefixes left-padded (prefix_attention_mask), suffixes right-padded
(suffix_attention_mask). With classifier-free guidance both prefix and suffix are masked in the
unconditional pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from veomni.diffusion.sampling.api import run_alg
from veomni.diffusion.sampling.config import resolve_for_model
from veomni.diffusion.sampling.engine import DecodeState


@dataclass
class InfillOutput:
    middle: torch.Tensor  # [B, n_middle]
    sequences: torch.Tensor  # [B, P + n_middle + S]
    history: Optional[List[torch.Tensor]] = None
    stats: Dict[str, float] = field(default_factory=dict)
    prefix_len: int = 0


@torch.no_grad()
def infill(model, prefix_ids, suffix_ids, n_middle: int, config=None,
           prefix_attention_mask: Optional[torch.Tensor] = None,
           suffix_attention_mask: Optional[torch.Tensor] = None, **overrides) -> InfillOutput:
    if not isinstance(n_middle, int) or n_middle < 1:
        raise ValueError(f"n_middle must be an int >= 1 (got {n_middle!r})")
    user_n = overrides.get("max_new_tokens", getattr(config, "max_new_tokens", None)
                           if not isinstance(config, dict) else config.get("max_new_tokens"))
    if user_n is not None and user_n != n_middle:
        raise ValueError(f"infill: max_new_tokens={user_n} conflicts with n_middle={n_middle}; "
                         "the middle length is n_middle, leave max_new_tokens unset.")
    overrides = dict(overrides, max_new_tokens=n_middle)
    cfg = resolve_for_model(model, config, overrides)
    state = DecodeState(model, cfg, prefix_ids, prefix_attention_mask, n_middle, suffix_ids,
                        suffix_attention_mask, handle_eos=False)
    run_alg(state)
    out = state.finish(trim_eos=False)
    return InfillOutput(middle=out.sequences[:, state.g0:state.g1], sequences=out.sequences,
                        history=out.history, stats=out.stats, prefix_len=state.g0)
