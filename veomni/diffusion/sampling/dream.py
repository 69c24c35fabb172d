"""Dream's whole-sequence samplers: origin, maskgit_plus, topk_margin, entropy.

Every step reads logits for every generated position; t runs over linspace(1, eps, steps+1).
  origin       each masked position is revealed with probability 1 - s/t (all at the last step),
               its token sampled from the model (random positions even when greedy: use a seed).
  confidence   maskgit_plus = p(x0), topk_margin = p1 - p2, entropy = sum p log p; the
               int(#mask * (1 - s/t)) most confident positions are committed (all at the last step),
               or that many are sampled from softmax(conf / alg_temp) when alg_temp > 0.
Dream's int() floors: with steps == max_new_tokens the first step commits 0 tokens and the last
step several. exact_step_counts=True spreads the tokens exactly over the steps (LLaDA's rule).
Counts are per row (Dream averages the mask count over the batch; rows always agree there).
"""
from __future__ import annotations

import torch

from veomni.diffusion.sampling.engine import DecodeState
from veomni.diffusion.sampling.utils import gumbel_topk_mask, spread_counts, topk_mask

_MEASURE = {"maskgit_plus": "prob", "topk_margin": "margin", "entropy": "neg_entropy"}


def dream_step_count(n_masked: torch.Tensor, t: torch.Tensor, s: torch.Tensor, last: bool) -> torch.Tensor:
    """Dream's per-step count, int(#mask * (1 - s/t)) in float32 like Dream, all at the last step."""
    if last:
        return n_masked
    return (n_masked.float() * (1 - s / t)).long()


def run_dream(state: DecodeState) -> None:
    cfg = state.cfg
    steps = cfg.steps
    grid = torch.linspace(1, cfg.eps, steps + 1, device=state.device)  # float32, as Dream
    exact = spread_counts(state.g1 - state.g0, steps) if cfg.exact_step_counts else None
    g0, g1 = state.g0, state.g1
    for i in range(steps):
        masked = state.masked()[:, g0:g1]
        if not bool(masked.any()):
            break
        logits = state.logits(g0, g1)
        t, s = grid[i], grid[i + 1]
        last = i == steps - 1
        if cfg.alg == "origin":
            p_reveal = 1.0 if last else float(1 - s / t)
            reveal = torch.zeros_like(masked)
            for b in range(state.bsz):  # one draw per masked position of the row, from its generator
                cols = masked[b].nonzero(as_tuple=True)[0]
                if cols.numel():
                    u = torch.rand(cols.numel(), generator=state.generators[b], device=state.device)
                    reveal[b, cols[u < p_reveal]] = True
            x0, _ = state.propose(logits, reveal)
            select = reveal
        else:
            x0, conf = state.propose(logits, masked, _MEASURE[cfg.alg])
            n_masked = masked.sum(1)
            if exact is not None:
                k = torch.full_like(n_masked, exact[i])
            else:
                k = dream_step_count(n_masked, t, s, last)
            if cfg.alg_temp:
                select = gumbel_topk_mask(conf, k, cfg.alg_temp, state.generators)
            else:
                select = topk_mask(conf, k)
        state.commit(select, x0, g0)
        state.end_step()
