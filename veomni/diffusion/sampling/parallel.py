"""Fast-dLLM parallel decoding rules, applied to the masked positions of the current block.

threshold (tau, default 0.9): commit every masked position whose confidence p(x0) >= tau, and
    always the single most confident one of EACH row, so every row progresses every step. (A
    batched fallback that picks one position for the whole batch — castlehill's bug — can stall a
    row whose confidences all sit below tau.)
factor (f, default 1.0): sort a row's confidences c_1 >= c_2 >= ...; commit the top n for the
    largest n with (i + 1) * (1 - c_i) < f for every i <= n, at least one. This is Fast-dLLM's
    factor rule: the error bound of committing n tokens at once grows like (n + 1) * (1 - c_n), so
    confident rows commit many tokens and uncertain ones few. (Fast-dLLM's code compares
    c_i >= 1 - f / (i + 1); only exact ties differ.)
Both are used by the semi-autoregressive loop (semi_ar.py), which also provides the KV caches.
"""
from __future__ import annotations

import torch

from veomni.diffusion.sampling.utils import rank_in_row


def _best_per_row(conf: torch.Tensor) -> torch.Tensor:
    has = torch.isfinite(conf).any(1)
    best = torch.zeros_like(conf, dtype=torch.bool)
    best[torch.arange(conf.shape[0], device=conf.device), conf.argmax(1)] = True
    return best & has[:, None]


def select_threshold(conf: torch.Tensor, tau: float) -> torch.Tensor:
    """conf [B, R] (-inf where not eligible) -> [B, R] bool."""
    return (torch.isfinite(conf) & (conf >= tau)) | _best_per_row(conf)


def factor_count(conf: torch.Tensor, f: float) -> torch.Tensor:
    """[B] number of tokens the factor rule commits per row (0 for rows with nothing eligible)."""
    c = torch.sort(conf, dim=1, descending=True).values
    n = torch.arange(1, c.shape[1] + 1, device=c.device, dtype=c.dtype)
    ok = torch.isfinite(c) & ((n + 1) * (1 - c) < f)
    n_take = ok.long().cumprod(1).sum(1).clamp_min(1)
    return n_take * torch.isfinite(c[:, 0]).long()


def select_factor(conf: torch.Tensor, f: float) -> torch.Tensor:
    k = factor_count(conf, f)
    return (rank_in_row(conf) < k[:, None]) & torch.isfinite(conf)
