"""Needleman-Wunsch alignment of x0 and x1 with blanks (Edit Flows, arXiv 2506.09018, section 3).

Edit Flows train on a coupling of x0 and x1 through an *aligned* pair (z0, z1) of equal length, in
which BLANK marks a gap: a column (a, BLANK) deletes a, (BLANK, b) inserts b, (a, b) with a != b
substitutes. Any alignment gives a valid flow; the shortest one (fewest edits) is what the
reference uses: a global Needleman-Wunsch alignment with match 0, substitution 1 and gap 1, whose
cost is the Levenshtein distance.

Two implementations, identical results (same DP, same tie-breaking on the traceback):
  * ``align_reference``: the textbook O(nm) double loop in Python (dllm's form); for tests.
  * ``align``: the same DP with each row computed by numpy at once. Within a row the only serial
    dependency is D[i][j] <- D[i][j-1] + 1 (a gap in x0); writing T[j] = min(diagonal, up), the row is
    D[i][j] = min_k<=j (T[k] + j - k), i.e. j + cummin(T - j): one `np.minimum.accumulate`. The
    traceback then walks O(n + m) cells of the stored table in Python.
scripts/bench_editflow_align.py measures both (docs/benchmarks.md).

Tie-breaking on the traceback (from the end): diagonal, then a gap in z1 (x0 token deleted), then a
gap in z0 (x1 token inserted). With an x0 of masks this puts the substitutions at the end and the
insertions at the front, as the reference does.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

BLANK = -1

__all__ = ["BLANK", "align", "align_reference", "edit_distance", "strip_blanks", "alignment_cost"]


def _check_ids(name: str, ids: Sequence[int]) -> None:
    if any(int(t) < 0 for t in ids):
        raise ValueError(f"{name} holds a negative token id; ids must be >= 0 (BLANK={BLANK} marks gaps)")


def align_reference(x0: Sequence[int], x1: Sequence[int]) -> Tuple[List[int], List[int]]:
    """Slow, obviously-correct Needleman-Wunsch (pure Python double loop). Returns (z0, z1)."""
    x0, x1 = [int(t) for t in x0], [int(t) for t in x1]
    _check_ids("x0", x0)
    _check_ids("x1", x1)
    n, m = len(x0), len(x1)
    dp = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        dp[i][0] = i
    for j in range(m + 1):
        dp[0][j] = j
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            dp[i][j] = min(dp[i - 1][j - 1] + (x0[i - 1] != x1[j - 1]), dp[i - 1][j] + 1, dp[i][j - 1] + 1)
    return _traceback(x0, x1, dp)


def _traceback(x0, x1, dp) -> Tuple[List[int], List[int]]:
    z0, z1 = [], []
    i, j = len(x0), len(x1)
    while i > 0 or j > 0:
        if i > 0 and j > 0 and dp[i][j] == dp[i - 1][j - 1] + (x0[i - 1] != x1[j - 1]):
            z0.append(x0[i - 1])
            z1.append(x1[j - 1])
            i, j = i - 1, j - 1
        elif i > 0 and dp[i][j] == dp[i - 1][j] + 1:
            z0.append(x0[i - 1])
            z1.append(BLANK)
            i -= 1
        else:
            z0.append(BLANK)
            z1.append(x1[j - 1])
            j -= 1
    return z0[::-1], z1[::-1]


def _table(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The (n+1) x (m+1) Levenshtein table, one numpy row at a time."""
    n, m = len(a), len(b)
    dp = np.empty((n + 1, m + 1), dtype=np.int32)
    ramp = np.arange(m + 1, dtype=np.int32)
    dp[0] = ramp
    for i in range(1, n + 1):
        prev, row = dp[i - 1], dp[i]
        row[0] = i
        # T[j] for j >= 1: best of the diagonal (match / substitute) and up (delete x0[i-1]).
        np.minimum(prev[:-1] + (b != a[i - 1]), prev[1:] + 1, out=row[1:])
        # left moves: D[j] = min_k<=j (T[k] + j - k) = j + cummin(T[k] - k)
        row -= ramp
        np.minimum.accumulate(row, out=row)
        row += ramp
    return dp


def align(x0: Sequence[int], x1: Sequence[int]) -> Tuple[List[int], List[int]]:
    """Optimal (minimum edit count) alignment of x0 and x1 with BLANKs: (z0, z1), equal lengths,
    ``strip_blanks(z0) == x0`` and ``strip_blanks(z1) == x1``. Same result as ``align_reference``."""
    a = np.asarray([int(t) for t in x0], dtype=np.int64)
    b = np.asarray([int(t) for t in x1], dtype=np.int64)
    if (a < 0).any() or (b < 0).any():
        _check_ids("x0", a.tolist())
        _check_ids("x1", b.tolist())
    if len(a) == 0 or len(b) == 0:  # all gaps
        return ([int(t) for t in a] + [BLANK] * len(b), [BLANK] * len(a) + [int(t) for t in b])
    dp = _table(a, b)
    return _traceback(a.tolist(), b.tolist(), dp)


def strip_blanks(z: Sequence[int]) -> List[int]:
    return [int(t) for t in z if t != BLANK]


def alignment_cost(z0: Sequence[int], z1: Sequence[int]) -> int:
    """Number of edit columns (insertions, deletions, substitutions) of an alignment."""
    if len(z0) != len(z1):
        raise ValueError(f"z0 and z1 differ in length ({len(z0)} vs {len(z1)})")
    if any(a == BLANK and b == BLANK for a, b in zip(z0, z1)):
        raise ValueError("an alignment column with two blanks is not an edit")
    return sum(int(a != b) for a, b in zip(z0, z1))


def edit_distance(x0: Sequence[int], x1: Sequence[int]) -> int:
    """Textbook Levenshtein distance with two rolling rows (independent of the code above)."""
    prev = list(range(len(x1) + 1))
    for i, a in enumerate(x0, start=1):
        cur = [i]
        for j, b in enumerate(x1, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a != b)))
        prev = cur
    return prev[-1]
