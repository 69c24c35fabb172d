"""Multi-block pipelined decoding (D2F / d3LLM): several blocks in flight at once.

Per row:
  - the row starts with one block of `block_length` masks; a new block is appended when the last
    one is >= block_add_threshold decoded (at most one per step, none after an EOS was committed
    when stop_at_eos). Blocks not yet appended do not exist: they are hidden from attention, so a
    bidirectional model sees a growing sequence, as in D2F;
  - a block is *fully active* when it is the first unfinished block or its predecessor is
    >= decoded_token_threshold decoded (once fully active, always); other appended blocks are
    semi-active;
  - each step commits every masked position of the appended blocks whose predictive entropy is
    < entropy_threshold (nats), plus, in every fully active block where nothing passed, its
    lowest-entropy position (D2F's rule; so the first unfinished block always progresses);
  - EOS early stop: a row stops once an EOS is committed with every position before it decoded.
KV cache (use_cache 'prefix' or 'block'): the blocks before a row's first unfinished block are
written once with their final tokens and then only read. Exact for block_causal models (decode
blocks follow the model's attention blocks); approximate for bidirectional ones, whose cached keys
were computed while later blocks were still masked.
"""
from __future__ import annotations

import torch

from veomni.diffusion.sampling.engine import DecodeState


def run_multi_block(state: DecodeState) -> None:
    cfg = state.cfg
    blk = state.block_ids(cfg.block_length)
    idx, T, bsz, dev = state.idx, state.T, state.bsz, state.device
    n_blocks = blk.max(1).values + 1
    kk = torch.arange(int(n_blocks.max()), device=dev)
    one_hot = blk[:, :, None] == kk  # [B, T, NB]
    size = one_hot.sum(1).clamp_min(1)
    added = torch.ones(bsz, dtype=torch.long, device=dev)
    fully = torch.zeros(bsz, kk.numel(), dtype=torch.bool, device=dev)
    clean = torch.zeros(bsz, dtype=torch.long, device=dev)
    while True:
        masked = state.masked()
        active = masked.any(1)
        if not bool(active.any()):
            break
        decoded = (one_hot & (state.x != state.mask_id)[:, :, None]).sum(1)
        frac = decoded / size
        last_frac = frac.gather(1, (added - 1)[:, None])[:, 0]
        eos_seen = (state.first_eos() < T) & torch.tensor(state.stop_at_eos, device=dev)
        grow = active & (added < n_blocks) & (last_frac >= cfg.block_add_threshold) & ~eos_seen
        added = added + grow.long()

        first_block = torch.where(masked, blk, torch.full_like(blk, T)).min(1).values
        prev_frac = torch.cat([torch.ones_like(frac[:, :1]), frac[:, :-1]], dim=1)
        appended = kk[None] < added[:, None]
        fully |= appended & ((kk[None] == first_block[:, None]) | (prev_frac >= cfg.decoded_token_threshold))

        present = ~state.is_gen | (blk < added[:, None])
        in_play = masked & present
        start = int(torch.where(in_play, idx, T).min())
        end = int(torch.where(in_play, idx + 1, 0).max())
        lo = hi = None
        if cfg.use_cache != "none":
            last_present = torch.where(present & state.valid, idx + 1, 0).max(1).values
            lo = torch.where(active, clean, 0)
            hi = torch.where(active, last_present, 0)
        logits = state.logits(start, end, lo, hi, present=present)
        eligible = in_play[:, start:end]
        x0, neg_entropy = state.propose(logits, eligible, "neg_entropy")
        select = eligible & (-neg_entropy < cfg.entropy_threshold)

        # D2F: a fully active block where nothing passed commits its most confident position.
        in_blocks = one_hot[:, start:end] & eligible[:, :, None]  # [B, R, NB]
        need = fully & in_blocks.any(1) & ~(in_blocks & select[:, :, None]).any(1)
        scores = neg_entropy[:, :, None].expand_as(in_blocks).masked_fill(~in_blocks, float("-inf"))
        best = scores.argmax(1)  # [B, NB]
        rows = torch.arange(bsz, device=dev)[:, None].expand_as(best)
        select[rows[need], best[need]] = True

        if cfg.use_cache != "none":
            first_masked = torch.where(masked, idx, T).min(1).values
            block_start = torch.where(blk == first_block[:, None], idx, T).min(1).values
            clean = torch.where(active, torch.minimum(hi, state.cache_boundary(first_masked, block_start)), clean)
        state.commit(select, x0, start)
        state.end_step()
