"""A KV cache whose writes are limited to a per-row window, and the window rules of each mode.

Why per-row windows: in a batch, rows reach block boundaries at different steps. With the plain
row-index cache (veomni/models/kv_cache.py) every forward rewrites the same indices for every row,
so a row's cached keys would depend on when its batch mates refreshed — the class of bug behind
Fast-dLLM's wrong dual cache for batch > 1 (its PRs #17/#57). Here each row states the index range
it would forward if it ran alone ([lo_b, hi_b)); the batch forwards the union, and
`WindowedKVCache.update` keeps the old keys/values of a row outside its own window. Every row then
sees exactly the cache it would have seen alone, whatever the batch.

Cache modes (what a row writes each step; `block_start/end` = its current decode block):
  prefix  first step of a block: [0, T) (refresh); other steps: [block_start, T)   (Fast-dLLM)
  dual    first step of a block: [0, T); other steps: [block_start, block_end)    (Fast-dLLM)
  block   [clean, end of the attention block holding block_end-1); `clean` moves past every
          attention block that was all-decoded when last written, so each finished block is
          rewritten once with its final tokens and then only read. Exact for block_causal models.
For block_causal models, prefix/dual windows are widened to attention-block boundaries: a row's
first decode block shares its attention block with the prompt's tail, whose keys must be rewritten.
"""
from __future__ import annotations

from typing import Optional

import torch

from veomni.models.kv_cache import KVCache


class WindowedKVCache(KVCache):
    """KVCache where row b only writes indices in [lo[b], hi[b]) (no window = write everything).

    Also the fast path for samplers: storage is preallocated for the whole row (`capacity`) and
    written in place; the engine announces each forward's slice [q0, q1) as Python ints with
    `begin()`. The base class checks gaps with two host syncs and copies the whole cache per
    tensor per layer (measured on an H100, bf16, 24 layers: a 32-token cached forward cost 2x a
    512-token uncached one); here a write is one in-place slice copy and no sync.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0  # indices written so far
        self._slice = None
        self._keep: Optional[torch.Tensor] = None

    def get_seq_length(self) -> int:
        return self.length

    def begin(self, q0: int, q1: int, lo: Optional[torch.Tensor], hi: Optional[torch.Tensor]) -> None:
        """Announce the next forward: queries at row indices [q0, q1), per-row window [lo, hi)."""
        if q0 > self.length or q1 > self.capacity:
            raise RuntimeError(f"internal: cache write [{q0}, {q1}) would leave a gap or overflow "
                               f"({self.length} written, capacity {self.capacity})")
        old = self.length
        self._slice = (q0, q1)
        self.length = max(old, q1)
        self._keep = None
        if lo is not None:
            pos = torch.arange(q0, q1, device=lo.device)[None, :]
            inside = (pos >= lo[:, None]) & (pos < hi[:, None])
            # Outside its window a row keeps its existing entries; indices never written before
            # take the new values (nothing to keep, and the row never attends to them: they are
            # later attention blocks or not-yet-appended blocks, see the callers).
            keep = ~inside & (pos < old)
            self._keep = keep[:, None, :, None]

    def _store(self, store: Optional[torch.Tensor], new: torch.Tensor, dim: int, merge: bool) -> torch.Tensor:
        if self._slice is None:
            raise RuntimeError("WindowedKVCache.begin() must announce each forward's slice")
        q0, q1 = self._slice
        if new.shape[dim] != q1 - q0:
            raise RuntimeError(f"internal: {new.shape[dim]} new entries for slice [{q0}, {q1})")
        if store is None:
            shape = list(new.shape)
            shape[dim] = self.capacity
            store = new.new_zeros(shape)
        dst = store.narrow(dim, q0, q1 - q0)
        if merge and self._keep is not None:
            keep = self._keep if dim == 2 else self._keep[:, 0]  # [B, 1, S, 1] for k/v, [B, S, 1] for [B, S, C]
            new = torch.where(keep, dst, new)
        dst.copy_(new)
        return store

    def update_meta(self, position_ids, valid, cache_position):
        # Positions and validity are written for every row: they are the same whenever written.
        self.positions = self._store(self.positions, position_ids, 1, merge=False)
        self.valid = self._store(self.valid, valid, 1, merge=False)
        return self.positions[:, : self.length], self.valid[:, : self.length]

    def update(self, layer_idx, k, v, cache_position):
        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
        self.keys[layer_idx] = self._store(self.keys[layer_idx], k, 2, merge=True)
        self.values[layer_idx] = self._store(self.values[layer_idx], v, 2, merge=True)
        return self.keys[layer_idx][:, :, : self.length], self.values[layer_idx][:, :, : self.length]


    def update_extra(self, name, layer_idx, new, cache_position):
        key = (name, layer_idx)
        self.extra[key] = self._store(self.extra.get(key), new, 1, merge=True)
        return self.extra[key][:, : self.length]


def attention_block_start(index: torch.Tensor, pos_at: torch.Tensor, block_size: int) -> torch.Tensor:
    """Row index where the attention block (by position id) holding `index` starts."""
    return index - torch.remainder(pos_at, block_size)


def attention_block_end(index: torch.Tensor, pos_at: torch.Tensor, block_size: int, total: int) -> torch.Tensor:
    """Row index just past the attention block holding `index` (clamped to the row length)."""
    return (attention_block_start(index, pos_at, block_size) + block_size).clamp(max=total)
