"""A slow, loop-by-loop EditFlow loss for tests: every step of objective.py redone in plain Python
from the same random draws (t, u), with the model run on each x_t alone (no padding) and full
log-softmax token distributions."""
from __future__ import annotations

import math
from typing import Callable, List, Sequence, Tuple

import torch

from veomni.diffusion.editflow.align import BLANK, align_reference, strip_blanks
from veomni.diffusion.editflow.flow import KappaSchedule


def reference_edits(zt: Sequence[int], z1: Sequence[int]) -> List[Tuple[str, int, int]]:
    """(kind, x_t position, token) of each remaining edit, by counting non-blanks column by column."""
    out = []
    for j, (a, b) in enumerate(zip(zt, z1)):
        if a == b:
            continue
        nb = sum(1 for k in range(j) if zt[k] != BLANK)
        if a == BLANK:
            out.append(("INS", nb - 1, b))
        elif b == BLANK:
            out.append(("DEL", nb, -1))
        else:
            out.append(("SUB", nb, b))
    return out


def reference_loss(x0s, x1s, prompt_lens, t: torch.Tensor, u: torch.Tensor, schedule: KappaSchedule,
                   run: Callable[[List[int]], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over non-empty sequences of loss_b. ``run(x_t)`` -> (rates [L, 3], sub_logits [L, V],
    ins_logits [L, V]) for one unpadded sequence."""
    losses = []
    for b, (x0, x1, p) in enumerate(zip(x0s, x1s, prompt_lens)):
        if not x1:
            continue
        a, c = align_reference(x0[p:], x1[p:])
        z0, z1 = list(x1[:p]) + a, list(x1[:p]) + c
        kappa = float(schedule.kappa(t[b:b + 1])[0])
        zt = [z1[j] if float(u[b, j]) < kappa else z0[j] for j in range(len(z0))]
        xt = strip_blanks(zt)
        rates, sub_logits, ins_logits = run(xt)
        w = float(schedule.weight(t[b:b + 1])[0])
        total = torch.zeros((), dtype=torch.float64)
        for i in range(len(xt)):
            if i >= p:
                total = total + rates[i, 0].double() + rates[i, 1].double()
            if i >= p - 1:
                total = total + rates[i, 2].double()
        for kind, pos, tok in reference_edits(zt, z1):
            if kind == "SUB":
                total = total - math.log(max(float(rates[pos, 0]), 1e-12)) - torch.log_softmax(
                    sub_logits[pos].double(), -1)[tok]
            elif kind == "DEL":
                total = total - math.log(max(float(rates[pos, 1]), 1e-12))
            else:
                total = total - math.log(max(float(rates[pos, 2]), 1e-12)) - torch.log_softmax(
                    ins_logits[pos].double(), -1)[tok]
        losses.append(w * total / len(x1))
    return torch.stack(losses).mean()
