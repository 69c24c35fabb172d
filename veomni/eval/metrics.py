"""pass@k: the unbiased estimator of Chen et al. (2021), per problem then averaged."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

DEFAULT_KS = (1, 10)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) passes.

    Equals 1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i): the binomials
    overflow floats for n in the hundreds, the product does not.
    """
    if not (0 <= c <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
    if not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Sequence[tuple], ks: Iterable[int] = DEFAULT_KS) -> dict:
    """{"pass@k": mean over problems} for every k with k <= min n; counts = [(n, c), ...]."""
    if not counts:
        raise ValueError("mean_pass_at_k needs at least one problem")
    min_n = min(n for n, _ in counts)
    return {
        f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in counts]))
        for k in sorted(set(ks))
        if k <= min_n
    }
