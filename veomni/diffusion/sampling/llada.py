"""LLaDA's remasking rules inside a semi-autoregressive block: `low_confidence` and `random`, and
`low_entropy` (the same schedule ranked by entropy: d3LLM's trajectory teacher).

The generated span is cut into blocks of `block_length`; every block gets steps / num_blocks steps
and its masked tokens are spread exactly over them (LLaDA's get_num_transfer_tokens: base count,
the remainder going to the first steps). Each step commits the k most confident masked positions
of the current block only (confidence = p(x0), uniform noise for `random`, minus the entropy for
`low_entropy`). Steps that would commit nothing (a block with fewer tokens than steps) are skipped:
LLaDA spends a forward on them without changing the sequence, so the output is the same with fewer
forwards.
Confidence here is p(x0) under the tempered distribution (Dream's convention); LLaDA scores the
Gumbel-sampled token with the untempered softmax. Identical at temperature 0.
"""
from __future__ import annotations

import torch

from veomni.diffusion.sampling.utils import topk_mask


def llada_step_count(n_block: torch.Tensor, steps_per_block: int, step_in_block: torch.Tensor) -> torch.Tensor:
    """Tokens to commit at `step_in_block` for blocks of n_block masks (vectorised spread_counts)."""
    base = torch.div(n_block, steps_per_block, rounding_mode="floor")
    return base + (step_in_block < torch.remainder(n_block, steps_per_block)).long()


def select_top_k(conf: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The k[b] most confident eligible positions of each row (conf is -inf where not eligible)."""
    return topk_mask(conf, k)
