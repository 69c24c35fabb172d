"""Fast-dLLM parallel decoding rules, applied to the masked positions of the current block.

threshold (tau, default 0.9): commit every masked position whose confidence p(x0) >= tau, and
    always the single most confident one of EACH row, so every row progresses every step. (A
    batched fallback that picks one position for the whole batch — castlehill's bug — can stall a
    row whose confidences all sit below tau.)
factor (f, default 1.0): Fast-dLLM's factor rule (its llada/generate.py, get_transfer_index_dynamic).
    Sort a row's confidences c_1 >= c_2 >= ... >= c_m (m = masked positions of the block); a
    candidate n passes when c_n >= 1 - f / (n + 1) (the first always passes). Commit the leading
    run of passing candidates, except that when the first failure is the LAST candidate (n = m)
    all m are committed: Fast-dLLM's loop leaves its index at m - 1 both when nothing fails and when
    only the last fails, and then adds one. So with f = 1 and confidences [0.9, 0.1] it commits
    both, and a block's last two masks always go together. We match that by default;
    factor_strict=True commits only the passing run (at least one): the rule without the quirk.
    Thresholds are computed as Fast-dLLM does (1 - f / (n + 1) in float64, compared with >=), so
    confidences that sit exactly on a threshold pass in both.
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


def factor_count(conf: torch.Tensor, f: float, strict: bool = False) -> torch.Tensor:
    """[B] number of tokens the factor rule commits per row (0 for rows with nothing eligible).

    conf [B, R], -inf where not eligible. strict=False: Fast-dLLM's count (see the module
    docstring); strict=True: only the leading candidates that pass, at least one.
    """
    c = torch.sort(conf.double(), dim=1, descending=True).values
    finite = torch.isfinite(c)
    m = finite.sum(1)
    # Bit-equal to Fast-dLLM's Python floats: a tensor / tensor division, because torch computes
    # scalar / tensor as scalar * (1 / tensor), which puts some thresholds one ulp off
    # (1 - 3 * (1/5) = 0.3999999999999999, not 0.4).
    n = torch.arange(1, c.shape[1] + 1, device=c.device, dtype=torch.float64)
    thresh = 1 - torch.full_like(n, f) / (n + 1)
    passes = finite & (c >= thresh)
    passes[:, 0] = finite[:, 0]  # Fast-dLLM: the most confident candidate is always taken
    n_pass = passes.long().cumprod(1).sum(1)
    if not strict:
        # The first failure is the last candidate: Fast-dLLM's off-by-one commits it as well.
        n_pass = torch.where(n_pass == m - 1, m, n_pass)
    return n_pass


def select_factor(conf: torch.Tensor, f: float, strict: bool = False) -> torch.Tensor:
    k = factor_count(conf, f, strict)
    return (rank_in_row(conf) < k[:, None]) & torch.isfinite(conf)
