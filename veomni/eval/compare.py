"""evalplus output comparison, computed in the scorer (never in the candidate's process).

Re-implemented from evalplus' `evaluate.py` / `_special_oracle.py` semantics, numpy-free. Both
sides arrive here as plain literals decoded by `_literal.loads`, so `==` cannot run candidate code.
"""

import math

MBPP_OUTPUT_NOT_NONE = ("check_str", "text_match_three", "text_starta_endb")
MBPP_OUTPUT_SET_EQ = ("similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly",
                      "larg_nnum", "intersection_array", "find_dissimilar", "Diff")


def _poly(xs, x):
    return sum(coeff * math.pow(x, i) for i, coeff in enumerate(xs))


def _surface_area_oracle(base_edge, height):  # Mbpp/581: height is the pyramid's vertical height
    slant = math.sqrt((base_edge / 2) ** 2 + height**2)
    return round(base_edge**2 + 2 * base_edge * slant)


def _digit_distance_oracle(a, b):  # Mbpp/558: pad the shorter number with leading zeros
    sa, sb = str(a), str(b)
    width = max(len(sa), len(sb))
    return sum(abs(int(x) - int(y)) for x, y in zip(sa.zfill(width), sb.zfill(width)))


def is_floats(x):
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(i, float) for i in x)
    return False


def _is_number(x):
    return isinstance(x, (int, float, complex))  # bool is an int, as numpy treats it


def allclose(out, exp, atol, rtol=1e-7):
    """numpy.allclose(out, exp) for scalars and (nested) sequences: |out-exp| <= atol + rtol*|exp|."""
    if isinstance(exp, (list, tuple)):
        if not isinstance(out, (list, tuple)) or len(out) != len(exp):
            return False
        return all(allclose(o, e, atol, rtol) for o, e in zip(out, exp))
    if not (_is_number(out) and _is_number(exp)):
        return False
    if out == exp:  # covers equal infinities
        return True
    if any(isinstance(v, (float, complex)) and (cmath_isnan(v) or cmath_isinf(v)) for v in (out, exp)):
        return False
    return abs(out - exp) <= atol + rtol * abs(exp)


def cmath_isnan(v):
    return math.isnan(v.real) or math.isnan(v.imag) if isinstance(v, complex) else math.isnan(v)


def cmath_isinf(v):
    return math.isinf(v.real) or math.isinf(v.imag) if isinstance(v, complex) else math.isinf(v)


def outputs_match(dataset, entry_point, inp, out, exp, atol):
    """True when candidate output `out` is accepted for expected output `exp` (evalplus rules)."""
    if dataset == "humaneval" and entry_point == "find_zero":
        # HumanEval/32: any root is fine; check the polynomial value at the candidate's answer.
        return abs(_poly(*inp, out)) <= atol
    exact = out == exp
    if not isinstance(exact, bool):
        exact = bool(exact)  # e.g. a custom __eq__; bool() of an array raises -> failure
    if dataset == "mbpp":
        if entry_point == "are_equivalent":  # Mbpp/164: the reference itself is ambiguous
            exact = True
        elif entry_point == "sum_div":  # Mbpp/295
            exact = exact or out == 0
        elif entry_point == "surface_Area":  # Mbpp/581
            exact = exact or abs(out - _surface_area_oracle(*inp)) <= atol
        elif entry_point == "digit_distance_nums":  # Mbpp/558
            exact = exact or out == _digit_distance_oracle(*inp)
        elif entry_point in MBPP_OUTPUT_SET_EQ:
            exact = set(out) == set(exp)
        elif entry_point in MBPP_OUTPUT_NOT_NONE:
            # The expected value was reduced to `reference is not None` (re.Match objects).
            exact = out == exp if isinstance(out, bool) else exp == (out is not None)
    if atol == 0 and is_floats(exp):
        atol = 1e-6  # evalplus always allows float noise
    if not exact and atol != 0:
        if type(out) is not type(exp):
            return False
        return allclose(out, exp, atol)
    return bool(exact)


