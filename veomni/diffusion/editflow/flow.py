"""The Edit Flows probability path: kappa schedules, x0 samplers, z_t and the remaining edits.

Given an aligned pair (z0, z1) (veomni/diffusion/editflow/align.py), the path at time t keeps each
column of z0 or replaces it by the column of z1 independently with probability kappa(t):
z_t = where(u < kappa(t), z1, z0). Stripping the blanks gives the model input x_t. The edits that
remain are the columns where z_t != z1, expressed at positions of x_t (nb = number of non-blank
z_t columns before the column):

  z_t = BLANK, z1 = b      insert b after x_t[nb - 1]
  z_t = a,     z1 = BLANK  delete x_t[nb]
  z_t = a,     z1 = b != a substitute x_t[nb] by b

Several insertions may land after the same position (runs of blanks); x_t[0] (BOS or the prompt)
always exists, so nb >= 1 before any insert column.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import List, Sequence

import torch

from veomni.diffusion.editflow.align import BLANK

__all__ = ["KappaSchedule", "X0Sampler", "Edits", "sample_zt", "remaining_edits", "strip_rows", "KAPPA_SCHEDULES"]

KAPPA_SCHEDULES = ("cubic", "linear", "cosine")


@dataclass(frozen=True)
class KappaSchedule:
    """kappa(t) with kappa(0) = 0, kappa(1) = 1; w(t) = kappa'(t) / (1 - kappa(t)), clamped at max_w.

    cubic: 2t^3 - 3t^2 + 2t (the Edit Flows / dllm training default), linear: t,
    cosine: 1 - cos(pi t / 2)."""

    name: str = "cubic"
    max_w: float = 20.0

    def __post_init__(self):
        if self.name not in KAPPA_SCHEDULES:
            raise ValueError(f"unknown kappa schedule {self.name!r}; choose one of {list(KAPPA_SCHEDULES)}")
        if not self.max_w > 0:
            raise ValueError(f"max_w must be > 0, got {self.max_w}")

    def kappa(self, t: torch.Tensor) -> torch.Tensor:
        if self.name == "cubic":
            return 2 * t**3 - 3 * t**2 + 2 * t
        if self.name == "linear":
            return t.clone()
        return 1 - torch.cos(0.5 * math.pi * t)

    def dkappa(self, t: torch.Tensor) -> torch.Tensor:
        if self.name == "cubic":
            return 6 * t**2 - 6 * t + 2
        if self.name == "linear":
            return torch.ones_like(t)
        return 0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        # 1 - kappa -> 0 as t -> 1; the clamp bounds the loss weight and the sampler's jump rates there.
        return (self.dkappa(t) / (1 - self.kappa(t)).clamp_min(1e-6)).clamp(max=self.max_w)


class X0Sampler:
    """The source x0 after the frozen prefix: ``masks:N`` (N mask tokens, dllm's masks[length:N]) or
    ``empty`` (nothing: pure insertion)."""

    def __init__(self, spec: str, mask_token_id: int):
        m = re.fullmatch(r"masks:(\d+)|empty", spec.strip())
        if not m:
            raise ValueError(f"unknown x0 sampler {spec!r}: use 'masks:N' (N mask tokens, e.g. masks:64) or 'empty'")
        self.spec = spec
        self.length = int(m.group(1)) if m.group(1) else 0
        self.mask_token_id = int(mask_token_id)

    def __call__(self, x1_tail: Sequence[int]) -> List[int]:
        return [self.mask_token_id] * self.length


def sample_zt(z0: torch.Tensor, z1: torch.Tensor, kappa: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[B, Lz] z_t: column j of row b is z1 where u[b, j] < kappa[b], else z0 (BLANK padding stays)."""
    return torch.where(u < kappa[:, None], z1, z0)


def strip_rows(zt: torch.Tensor, valid: torch.Tensor, pad_id: int):
    """Remove blanks row by row: (x_t [B, Lx] right-padded with pad_id, lengths [B], nb [B, Lz]) where
    nb[b, j] = non-blank columns of row b before column j (the x_t position of column j)."""
    keep = valid & (zt != BLANK)
    nb = torch.cumsum(keep.long(), dim=1) - keep.long()
    lengths = keep.sum(1)
    width = max(int(lengths.max()) if lengths.numel() else 0, 1)
    xt = torch.full((zt.shape[0], width), pad_id, dtype=torch.long, device=zt.device)
    rows, cols = keep.nonzero(as_tuple=True)
    xt[rows, nb[rows, cols]] = zt[rows, cols]
    return xt, lengths, nb


@dataclass
class Edits:
    """The remaining edits of a batch, as (row, x_t position[, token]) index tensors."""

    sub: torch.Tensor  # [Ks, 3] (b, pos, token)
    ins: torch.Tensor  # [Ki, 3] (b, pos, token): insert token after x_t[b, pos]
    dele: torch.Tensor  # [Kd, 2] (b, pos)


def remaining_edits(zt: torch.Tensor, z1: torch.Tensor, valid: torch.Tensor, nb: torch.Tensor) -> Edits:
    diff = valid & (zt != z1)
    ins = diff & (zt == BLANK)
    dele = diff & (z1 == BLANK)
    sub = diff & ~ins & ~dele

    def pick(mask, offset, with_token=True):
        b, j = mask.nonzero(as_tuple=True)
        cols = [b, nb[b, j] + offset] + ([z1[b, j]] if with_token else [])
        return torch.stack(cols, dim=1).long()

    return Edits(sub=pick(sub, 0), ins=pick(ins, -1), dele=pick(dele, 0, with_token=False))
