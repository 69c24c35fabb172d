"""The semi-autoregressive block loop shared by LLaDA (low_confidence, random, low_entropy) and Fast-dLLM
(threshold, factor), with the prefix / dual / block KV caches.

Each row decodes its own current block (the block of its first masked position); only masked
positions of that block may be committed. Rows move on independently: a row that finishes a block
starts the next one while its batch mates are still busy, and with a cache it refreshes on its own
schedule (per-row write windows, see cache.py). This is what makes batched decoding give exactly
the rows' one-by-one results, caches included.
"""
from __future__ import annotations

import math

import torch

from veomni.diffusion.sampling.config import LLADA_ALGS
from veomni.diffusion.sampling.engine import DecodeState
from veomni.diffusion.sampling.llada import llada_step_count, select_top_k
from veomni.diffusion.sampling.parallel import select_factor, select_threshold

# Confidence of each LLaDA-schedule alg (threshold / factor use p(x0)). low_entropy ranks by
# sum p log p: with steps == max_new_tokens it commits the single lowest-entropy masked position of
# the block per step, d3LLM's teacher rule ('entropy_threshold' with threshold -inf).
_MEASURE = {"random": "random", "low_entropy": "neg_entropy"}


def _windows(state: DecodeState, new, active, bstart, bend, clean):
    """Per-row cache write window [lo, hi) for this step (see cache.py for each mode)."""
    mode = state.cfg.use_cache
    if mode == "none":
        return None, None
    zero = torch.zeros_like(bstart)
    total = torch.full_like(bstart, state.T)
    if state.cfg.attn_mode == "block_causal":
        # The block's keys depend on its whole attention block, which can start before the decode
        # block (a row's first block shares one with the prompt's tail): rewrite all of it.
        bstart, bend = state.cache_boundary(bstart, bstart), state.attention_block_end(bend - 1)
    if mode == "prefix":
        lo, hi = torch.where(new, zero, bstart), total
    elif mode == "dual":
        lo, hi = torch.where(new, zero, bstart), torch.where(new, total, bend)
    else:  # block (block_causal only: bend is already the attention block's end)
        lo, hi = clean, bend
    return torch.where(active, lo, zero), torch.where(active, hi, zero)


def run_semi_ar(state: DecodeState) -> None:
    cfg = state.cfg
    blk = state.block_ids(cfg.block_length)
    idx, T = state.idx, state.T
    llada = cfg.alg in LLADA_ALGS
    if llada:
        steps_per_block = cfg.steps // math.ceil((state.g1 - state.g0) / cfg.block_length)
    prev_block = torch.full((state.bsz,), -1, dtype=torch.long, device=state.device)
    block_masks = torch.zeros_like(prev_block)  # LLaDA: masks in the block when it started
    step_in_block = torch.zeros_like(prev_block)
    clean = torch.zeros_like(prev_block)  # block cache: keys before this index are final
    while True:
        masked = state.masked()
        active = masked.any(1)
        if not bool(active.any()):
            break
        cur = torch.where(masked, blk, torch.full_like(blk, T)).min(1).values
        in_block = (blk == cur[:, None]) & active[:, None]
        new = active & (cur != prev_block)
        bstart = torch.where(in_block, idx, T).min(1).values
        bend = torch.where(in_block, idx + 1, 0).max(1).values
        start, end = int(bstart[active].min()), int(bend[active].max())

        lo, hi = _windows(state, new, active, bstart, bend, clean)
        logits = state.logits(start, end, lo, hi)
        eligible = (masked & in_block)[:, start:end]
        x0, conf = state.propose(logits, eligible, _MEASURE.get(cfg.alg, "prob"))
        if llada:
            block_masks = torch.where(new, eligible.sum(1), block_masks)
            step_in_block = torch.where(new, torch.zeros_like(step_in_block), step_in_block)
            k = llada_step_count(block_masks, steps_per_block, step_in_block) * active
            select = select_top_k(conf, k)
            step_in_block = step_in_block + 1
        elif cfg.alg == "threshold":
            select = select_threshold(conf, cfg.threshold)
        else:
            select = select_factor(conf, cfg.factor, cfg.factor_strict)
        if cfg.use_cache == "block":
            # Keys written this step are final up to the attention block of the first position that
            # was still masked when they were computed.
            first_masked = torch.where(masked, idx, T).min(1).values
            clean = torch.where(active, torch.minimum(hi, state.cache_boundary(first_masked, bstart)), clean)
        prev_block = torch.where(active, cur, prev_block)
        state.commit(select, x0, start)
        state.end_step()
