"""A key/value cache addressed by row index, shared by every sampler.

Diffusion decoding re-computes tokens in the middle of a row, so an append-only cache (HF's
DynamicCache) is not enough. Here a forward call names the row indices its queries occupy
(`cache_position`); their keys/values are *written* at those indices and attention runs over
every index written so far. That single rule covers:
  - prefix cache: forward [block_start, S) once, later forward only [block_start, block_end):
    the block is overwritten, the prefix is read back;
  - dual cache (Fast-dLLM): forward the whole row once, then only the current block; prefix and
    suffix keys are read back (approximate for bidirectional models: they were computed when the
    block was still masked);
  - block cache for block-causal models: finished blocks are written once and never change, which
    makes the cache exact.
Writes must keep the cache contiguous: new indices may overwrite or extend, never leave a gap.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch


class KVCache:
    def __init__(self) -> None:
        self.keys: List[Optional[torch.Tensor]] = []
        self.values: List[Optional[torch.Tensor]] = []
        # Per-row position ids and key-validity of every cached index: block-causal masks use the
        # positions, padding masks the validity.
        self.positions: Optional[torch.Tensor] = None  # [B, L]
        self.valid: Optional[torch.Tensor] = None  # [B, L] bool
        # Linear-attention (GDN) layers cache their per-token inputs, [B, L, C] by (name, layer),
        # and recurrent-state snapshots {row index j: state after [0, j)} per layer
        # (veomni/models/transformers/gated_deltanet.py).
        self.extra: Dict[Tuple[str, int], torch.Tensor] = {}
        self.states: Dict[int, Dict[int, torch.Tensor]] = {}

    def get_seq_length(self) -> int:
        return 0 if self.positions is None else self.positions.shape[1]

    def _write(self, store: Optional[torch.Tensor], new: torch.Tensor, idx: torch.Tensor, dim: int):
        cur = 0 if store is None else store.shape[dim]
        end = int(idx.max()) + 1
        if int(idx.min()) > cur:
            raise ValueError(
                f"KV cache write at row index {int(idx.min())} would leave a gap (cache holds "
                f"{cur} entries). Forward the missing positions first."
            )
        if store is None or end > cur:
            shape = list(new.shape)
            shape[dim] = end
            grown = new.new_zeros(shape)
            if store is not None:
                grown.narrow(dim, 0, cur).copy_(store)
            store = grown
        return store.index_copy(dim, idx, new)

    def update_meta(self, position_ids: torch.Tensor, valid: torch.Tensor, cache_position: torch.Tensor):
        """Record position ids / validity of the new entries; returns full [B, L] tensors."""
        self.positions = self._write(self.positions, position_ids, cache_position, 1)
        self.valid = self._write(self.valid, valid, cache_position, 1)
        return self.positions, self.valid

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor):
        """Write k/v [B, Hkv, Sq, D] at `cache_position` and return the full [B, Hkv, L, D] pair."""
        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
        self.keys[layer_idx] = self._write(self.keys[layer_idx], k, cache_position, 2)
        self.values[layer_idx] = self._write(self.values[layer_idx], v, cache_position, 2)
        return self.keys[layer_idx], self.values[layer_idx]

    def update_extra(self, name: str, layer_idx: int, new: torch.Tensor, cache_position: torch.Tensor):
        """Write per-token values [B, Sq, C] at `cache_position`; return all of them [B, L, C]."""
        key = (name, layer_idx)
        self.extra[key] = self._write(self.extra.get(key), new, cache_position, 1)
        return self.extra[key]

    def layer_states(self, layer_idx: int) -> Dict[int, torch.Tensor]:
        return self.states.setdefault(layer_idx, {})

    def crop(self, length: int) -> None:
        """Forget every index >= length (e.g. drop the speculative suffix of a prefix cache)."""
        if self.positions is None:
            return
        self.positions = self.positions[:, :length]
        self.valid = self.valid[:, :length]
        self.keys = [None if k is None else k[:, :, :length] for k in self.keys]
        self.values = [None if v is None else v[:, :, :length] for v in self.values]
        self.extra = {k: t[:, :length] for k, t in self.extra.items()}
        self.states = {i: {j: st for j, st in d.items() if j <= length} for i, d in self.states.items()}

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep only the rows in `index` (finished rows leave a batch)."""
        if self.positions is None:
            return
        self.positions, self.valid = self.positions[index], self.valid[index]
        self.keys = [None if k is None else k[index] for k in self.keys]
        self.values = [None if v is None else v[index] for v in self.values]
        self.extra = {k: t[index] for k, t in self.extra.items()}
        self.states = {i: {j: st[index] for j, st in d.items()} for i, d in self.states.items()}
