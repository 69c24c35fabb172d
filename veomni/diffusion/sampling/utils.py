"""Sampling from logits: temperature / top-p / top-k, confidence measures, Gumbel noise, selection.

All randomness comes from one torch.Generator per batch row and is drawn only for that row's
eligible positions, so a row samples the same tokens whether it runs alone or in a batch (given the
same seed), and greedy decoding draws nothing at all.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

NEG_INF = float("-inf")
MEASURES = ("prob", "margin", "neg_entropy", "random")


def shift_logits(logits: torch.Tensor) -> torch.Tensor:
    """Dream convention for AR-initialised dLLMs: token i is predicted at position i-1."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def spread_counts(total: int, steps: int) -> List[int]:
    """`total` tokens over `steps` steps as evenly as possible, remainder first (LLaDA)."""
    base, rem = divmod(int(total), int(steps))
    return [base + 1] * rem + [base] * (steps - rem)


def make_generators(seed, batch_size: int, device) -> List[torch.Generator]:
    """One generator per row: int seed -> seed + row; a list -> one seed per row; None -> drawn from
    torch's global RNG (so torch.manual_seed makes runs repeatable)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, int):
        seeds = [seed + b for b in range(batch_size)]
    else:
        seeds = list(seed)
        if len(seeds) != batch_size:
            raise ValueError(f"seed lists one seed per row: got {len(seeds)} seeds for {batch_size} rows")
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def filter_logits(logits: torch.Tensor, temperature: float, top_p: Optional[float],
                  top_k: Optional[int]) -> torch.Tensor:
    """Temperature, then nucleus, then top-k (Dream's order). Removed entries become -inf."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly better tokens
        drop_sorted = before > top_p  # keeps the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, NEG_INF)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    return logits


def gumbel(shape, generator: torch.Generator, device) -> torch.Tensor:
    """Standard Gumbel noise in float64 (LLaDA notes low-precision Gumbel hurts sample quality)."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    return -torch.log(-torch.log(u.clamp_min(1e-300)))


def _per_row_noise(counts: Sequence[int], width: Optional[int], generators, device) -> torch.Tensor:
    """Concatenated per-row draws: Gumbel [n_b, width] (or uniform [n_b] when width is None).
    `generators` may be a zero-argument callable, so greedy runs never create them."""
    if callable(generators):
        generators = generators()
    parts = []
    for b, n in enumerate(counts):
        if n == 0:
            continue  # a row with nothing to sample draws nothing (keeps batch == one-by-one)
        if width is None:
            parts.append(torch.rand(n, generator=generators[b], device=device, dtype=torch.float64))
        else:
            parts.append(gumbel((n, width), generators[b], device))
    return torch.cat(parts, dim=0)


def propose(logits: torch.Tensor, eligible: torch.Tensor, *, temperature: float, top_p=None,
            top_k=None, measure: str = "prob", generators=None,
            banned_token: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Candidate tokens and their confidence at eligible positions.

    logits [B, R, V], eligible [B, R] bool. Returns x0 [B, R] (0 where not eligible) and conf
    [B, R] (-inf where not eligible; higher = more confident):
      prob         p(x0) under the filtered distribution (maskgit_plus, LLaDA low_confidence)
      margin       p1 - p2 (topk_margin)
      neg_entropy  sum p log p, i.e. minus the entropy in nats (Dream 'entropy', multi_block)
      random       uniform noise (LLaDA 'random' remasking)
    temperature > 0 samples x0 by Gumbel-max (exactly a draw from softmax(logits/T)), else argmax.
    `banned_token` (the mask id) is never proposed: committing MASK would leave the position masked
    and a threshold decoder could then loop without progress.
    """
    if measure not in MEASURES:
        raise ValueError(f"unknown confidence measure {measure!r}; one of {MEASURES}")
    bsz, r, v = logits.shape
    x0 = torch.zeros(bsz, r, dtype=torch.long, device=logits.device)
    conf = torch.full((bsz, r), NEG_INF, dtype=torch.float64, device=logits.device)
    rows, cols = eligible.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return x0, conf
    z = logits[rows, cols]  # [K, V], a copy (advanced indexing)
    if banned_token is not None and banned_token < v:
        z[:, banned_token] = NEG_INF
    z = filter_logits(z, temperature, top_p, top_k)
    counts = eligible.sum(1).tolist()
    if temperature > 0:
        tok = (z.double() + _per_row_noise(counts, v, generators, logits.device)).argmax(-1)
    else:
        tok = z.argmax(-1)
    # fp32 unless the model is fp64: a [K, V] fp64 copy is ~1 GB for 1k positions x 150k vocab.
    probs = torch.softmax(z if z.dtype == torch.float64 else z.float(), dim=-1)
    if measure == "prob":
        c = probs.gather(-1, tok[:, None]).squeeze(-1)
    elif measure == "margin":
        top2 = torch.topk(probs, min(2, v), dim=-1).values
        c = top2[:, 0] - (top2[:, 1] if v > 1 else 0.0)
    elif measure == "neg_entropy":
        c = (probs * torch.log(probs + 1e-10)).sum(-1)  # Dream adds 1e-10 inside the log
    else:
        c = _per_row_noise(counts, None, generators, logits.device)
    x0[rows, cols] = tok
    conf[rows, cols] = c.to(conf.dtype)
    return x0, conf


def rank_in_row(scores: torch.Tensor) -> torch.Tensor:
    """0-based rank of each entry in its row, best first; ties broken by position (stable)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks


def topk_mask(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Select the k[b] best finite scores of each row ([B, R] bool)."""
    return (rank_in_row(scores) < k[:, None]) & torch.isfinite(scores)


def gumbel_topk_mask(scores: torch.Tensor, k: torch.Tensor, temp: float, generators) -> torch.Tensor:
    """Sample k[b] positions without replacement from softmax(scores/temp) (Gumbel-top-k; equal in
    law to Dream's multinomial over softmax(conf/alg_temp))."""
    noisy = scores.clone()
    finite = torch.isfinite(scores)
    counts = finite.sum(1).tolist()
    if sum(counts):
        rows, cols = finite.nonzero(as_tuple=True)
        noisy[rows, cols] = scores[rows, cols] / temp + _per_row_noise(counts, 1, generators, scores.device)[:, 0]
    return topk_mask(noisy, k)
