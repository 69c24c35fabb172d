"""Weighted mixture of several in-memory / packed datasets (``data.sources`` + ``data.mixture_weights``).

An epoch of the mixture has ``N = sum of the sources' rows`` rows (the amount of data one pass
over their concatenation would give). Row i of epoch e comes from source ``picks[i]``, drawn
i.i.d. with the weights from ``(seed, e)``; the c-th row drawn from source k in that epoch is
row ``c mod n_k`` of the ``c // n_k``-th permutation of that source drawn from
``(seed, k, e, c // n_k)``. So a source with a weight above its share of N is repeated, one below it
is subsampled (a new random subset each epoch), and the whole order is a pure function of
(seed, epoch): no state beyond the loader's (epoch, position), and independent of the dp size.
The streaming mixture (veomni/data/streaming.py) draws per row in each stream instead.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np


def normalise_weights(weights: Optional[Sequence[float]], n: int) -> List[float]:
    """Weights summing to 1, with clear errors; None/empty means one source of weight 1."""
    if weights is None or len(weights) == 0:
        if n == 1:
            return [1.0]
        raise ValueError(f"{n} data sources need mixture weights (data.mixture_weights, one per source)")
    if len(weights) != n:
        raise ValueError(f"data.mixture_weights has {len(weights)} value(s) for {n} data source(s); give one per source")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"data.mixture_weights must be finite, >= 0 and not all 0, got {list(weights)}")
    return (w / w.sum()).tolist()


class MixtureDataset:
    """Map-style view over several datasets; keys index their concatenation, ``epoch_order`` mixes."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], names: Optional[Sequence[str]] = None):
        if len(datasets) < 1:
            raise ValueError("a mixture needs at least one dataset")
        self.datasets = list(datasets)
        self.weights = normalise_weights(weights, len(self.datasets))
        self.names = list(names) if names is not None else [repr(d) for d in self.datasets]
        lens = {d.max_seq_len for d in self.datasets}
        if len(lens) != 1:
            raise ValueError(f"mixture sources have different max_seq_len {sorted(lens)}: every row must have the same "
                             "length (re-pack the packed sources with data.max_seq_len)")
        self.max_seq_len = lens.pop()
        self.sizes = [len(d) for d in self.datasets]
        self.offsets = np.zeros(len(self.sizes) + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=self.offsets[1:])
        self.num_tokens = sum(int(getattr(d, "num_tokens", 0)) for d in self.datasets)
        self.skipped = {}
        for d in self.datasets:
            self.skipped.update(getattr(d, "skipped", {}))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: int):
        k = int(np.searchsorted(self.offsets, key, side="right")) - 1
        return self.datasets[k][int(key - self.offsets[k])]

    def pad_row(self):
        return self.datasets[0].pad_row()

    def describe(self) -> list:
        """(rows, weight) per source: stored with the loader state, checked on resume."""
        return [[int(n), float(w)] for n, w in zip(self.sizes, self.weights)]

    def epoch_order(self, epoch: int, seed: int) -> np.ndarray:
        n = len(self)
        picks = np.random.default_rng([seed, epoch, 0x6D6978]).choice(len(self.sizes), size=n, p=self.weights)
        keys = np.empty(n, dtype=np.int64)
        for k, size in enumerate(self.sizes):
            where = np.flatnonzero(picks == k)
            if not len(where):
                continue
            reps = -(-len(where) // size)
            rows = np.concatenate([np.random.default_rng([seed, k, epoch, r, 0x737263]).permutation(size)
                                   for r in range(reps)])[:len(where)]
            keys[where] = self.offsets[k] + rows
        return keys

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}: {n} rows x {w:.3g}" for name, n, w in zip(self.names, self.sizes, self.weights))
        return f"MixtureDataset({parts}; {len(self)} rows per epoch)"
