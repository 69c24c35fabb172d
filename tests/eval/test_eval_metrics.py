"""pass@k estimator against hand-computed values and the exact binomial formula."""

from fractions import Fraction
from math import comb

import pytest

from veomni.eval.metrics import mean_pass_at_k, pass_at_k


@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (10, 3, 1, 0.3),
        (10, 3, 10, 1.0),
        (5, 0, 1, 0.0),
        (5, 0, 5, 0.0),
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (10, 10, 1, 1.0),
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomials_exactly():
    for n in range(1, 16):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(comb(n - c, k), comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_stable():
    # C(1000, 500) overflows a float; the product form must not.
    exact = 1 - Fraction(comb(1000 - 7, 500), comb(1000, 500))
    assert pass_at_k(1000, 7, 500) == pytest.approx(float(exact), rel=1e-9)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 0)


def test_mean_pass_at_k_averages_per_problem_and_skips_k_above_min_n():
    out = mean_pass_at_k([(10, 3), (10, 0)], ks=(1, 10))
    assert out == {"pass@1": pytest.approx(0.15), "pass@10": pytest.approx(0.5)}
    assert mean_pass_at_k([(10, 3), (5, 5)], ks=(1, 10)) == {"pass@1": pytest.approx(0.65)}
    with pytest.raises(ValueError):
        mean_pass_at_k([])
