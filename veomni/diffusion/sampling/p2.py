"""Open-dCoder's `p2` (path planning, Open-dLLM's generation_utils): decoded tokens can be re-masked.

Step i of `steps` (n = number of generated positions, kappa = (i+1)/steps):
  1. stop if no generated position is masked (steps > n leaves the last steps with nothing to do);
  2. one forward; propose x0 and its confidence p(x0) at EVERY generated position, decoded or not
     (a decoded position's confidence is the model's belief in its own prediction there);
  3. re-mask the floor(n * (1 - kappa)) least confident generated positions, decoded ones included;
  4. write x0 only at positions that were masked at the start of the step and are not re-masked.
     A decoded position that is not re-masked keeps its token: the MDM loss only trains
     predictions at masked positions, so a prediction at an unmasked one is never used as a token.
After step i exactly floor(n * (1 - kappa)) positions are masked, so the count is known ahead.

The count is computed like Open-dLLM, in float32 (`n.float() * (1.0 - kappa)` then floor): the
exact integer floor differs for some (n, steps), e.g. n = steps = 100 at i = 40 (59 vs 58), and
matching the reference token for token needs its rounding.
No EOS early stop: a committed EOS can still be re-masked by a later step.
"""
from __future__ import annotations

import torch

from veomni.diffusion.sampling.engine import DecodeState
from veomni.diffusion.sampling.utils import topk_mask


def p2_remask_count(step: int, steps: int, n: int) -> int:
    """Positions left masked after `step` (0-based) of `steps`: floor(n * (1 - (step+1)/steps)),
    with Open-dLLM's float32 rounding (see the module docstring)."""
    kappa = (step + 1) / steps
    count = int(torch.tensor(float(n), dtype=torch.float32).mul(1.0 - kappa).floor())
    return max(0, min(count, n))


def run_p2(state: DecodeState) -> None:
    g0, g1 = state.g0, state.g1
    n = g1 - g0
    steps = state.cfg.steps
    everywhere = torch.ones(state.bsz, n, dtype=torch.bool, device=state.device)
    for i in range(steps):
        masked = state.masked()[:, g0:g1]
        if not bool(masked.any()):
            break  # Open-dLLM stops here too; every row has the same n, so all rows end together
        logits = state.logits(g0, g1)
        x0, conf = state.propose(logits, everywhere, "prob")
        k = torch.full((state.bsz,), p2_remask_count(i, steps, n), dtype=torch.long, device=state.device)
        remask = topk_mask(-conf, k)  # the k least confident, decoded positions included
        write = masked & ~remask
        state.commit(remask | write, x0.masked_fill(remask, state.mask_id), g0)
        state.end_step(check_eos=False)
