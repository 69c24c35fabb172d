"""Open-dCoder's `p2` (path planning): decoded tokens can be revised.

Step i of `steps`: sample x0 at every generated position (masked or not), write it, then re-mask the
floor((1 - kappa) * n) lowest-confidence ones, kappa = (i+1)/steps, n = number of generated
positions. The floor is computed in integers, ((steps-i-1) * n) // steps, so float rounding cannot
change a count. The last step re-masks nothing. No EOS early stop: a later step may revise the EOS.
"""
from __future__ import annotations

import torch

from veomni.diffusion.sampling.engine import DecodeState
from veomni.diffusion.sampling.utils import topk_mask


def p2_remask_count(step: int, steps: int, n: int) -> int:
    return ((steps - step - 1) * n) // steps


def run_p2(state: DecodeState) -> None:
    g0, g1 = state.g0, state.g1
    n = g1 - g0
    steps = state.cfg.steps
    everywhere = torch.ones(state.bsz, n, dtype=torch.bool, device=state.device)
    for i in range(steps):
        logits = state.logits(g0, g1)
        x0, conf = state.propose(logits, everywhere, "prob")
        k = torch.full((state.bsz,), p2_remask_count(i, steps, n), dtype=torch.long, device=state.device)
        remask = topk_mask(-conf, k)  # the k least confident
        state.commit(everywhere, x0.masked_fill(remask, state.mask_id), g0)
        state.end_step(check_eos=False)
