"""Learning-rate schedules: linear warmup, then cosine / linear decay to min_lr_ratio, or constant."""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, warmup_steps: int, total_steps: int, kind: str, min_lr_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based: the first update uses step 0)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    if kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"lr_scheduler={kind!r}: expected cosine, linear or constant")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    return LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, kind, min_lr_ratio))
