"""Literal-only serialisation between the sandbox processes (stdlib only; no pickle, no eval).

A candidate's arguments, return values and outputs cross process boundaries as JSON text:

    None, bool, str, float (nan, inf, -0.0 kept)   -> JSON values
    int                                             -> JSON number, or {"i": hex} outside +-2**63
    list                                            -> JSON array
    tuple / set / frozenset / dict / bytes / bytearray / complex
                                                    -> {"t"|"s"|"f"|"d"|"b"|"B"|"c": ...}
    range, dict keys/values/items views             -> {"r"|"k"|"v"|"I": ...}, rebuilt as such
    any other iterator (generator, map, zip, ...)   -> {"g": [items]}, rebuilt as an iterator

Iterators travel as iterators (over their materialised items), so `tuple(candidate(x))` works as it
does in one process (HumanEval/33) while `candidate(x) == [...]` stays False.

Decoding only ever builds those built-in types, so a value that arrives from a hostile program can
be compared with `==` safely: it cannot carry a custom `__eq__`, code, or an object graph that
runs anything when loaded (which is why pickle is never used in that direction).

Encoding runs in the candidate's process and is best effort by design: whatever that process
sends is only data. Subclasses of the built-in types are reduced to the base type through the base
type's own methods (an `int` subclass with an always-true `__eq__` arrives as a plain int), and
numpy scalars to their `.item()`. Anything else is refused with `Unencodable`.

This file runs inside the sandbox children by path: it must not import veomni.
"""

import base64
import json

_BIG = 2**63
_INF = float("inf")
reductions = 0  # how often a subclass / numpy value was reduced to a plain one (see `dumps`)
_TAGS = ("i", "t", "s", "f", "d", "b", "B", "c", "r", "k", "v", "I", "g")
_VIEWS = (type({}.keys()), type({}.values()), type({}.items()))


class Unencodable(TypeError):
    """The value has a type the literal codec does not carry (e.g. a generator or a custom class)."""


_quote = json.encoder.encode_basestring_ascii  # json's own (C) string escaper


def _float(x: float) -> str:
    if x != x:
        return "NaN"
    if x in (_INF, -_INF):
        return "Infinity" if x > 0 else "-Infinity"
    return float.__repr__(x)  # what json.dumps writes: the shortest text that reads back exactly


def _enc(x) -> str:
    """JSON text for x, built directly (no intermediate tree: outputs can be millions of tuples);
    raises Unencodable, or RecursionError for very deep values."""
    t = type(x)
    if t is str:
        return _quote(x)
    if t is int:
        return int.__repr__(x) if -_BIG < x < _BIG else '{"i":"%s"}' % hex(x)
    if t is float:
        return _float(x)
    if x is None:
        return "null"
    if t is bool:
        return "true" if x else "false"
    if t is list:
        return "[" + ",".join(map(_enc, x)) + "]"
    if t is tuple:
        return '{"t":[' + ",".join(map(_enc, x)) + "]}"
    if t is dict:
        return '{"d":[' + ",".join("[" + _enc(k) + "," + _enc(v) + "]" for k, v in x.items()) + "]}"
    if t is set:
        return '{"s":[' + ",".join(map(_enc, x)) + "]}"
    if t is frozenset:
        return '{"f":[' + ",".join(map(_enc, x)) + "]}"
    if t is bytes:
        return '{"b":"%s"}' % base64.b64encode(x).decode("ascii")
    if t is bytearray:
        return '{"B":"%s"}' % base64.b64encode(bytes(x)).decode("ascii")
    if t is complex:
        return '{"c":[%s,%s]}' % (_float(x.real), _float(x.imag))
    if t is _Iterator:
        return _enc_iterator(x)
    if t is range:
        return '{"r":[%d,%d,%d]}' % (x.start, x.stop, x.step)
    if t in _VIEWS:
        tag = "kvI"[_VIEWS.index(t)]
        return '{"%s":[' % tag + ",".join(map(_enc, x)) + "]}"
    global reductions
    reductions += 1
    return _enc(_reduce(x))


def _reduce(x):
    """A subclass instance or numpy scalar as the plain built-in value it stands for."""
    # The base type's own methods, not the subclass's: an override cannot change the value sent.
    if isinstance(x, bool):
        return bool.__bool__(x)
    if isinstance(x, int):
        return int.__index__(x)
    if isinstance(x, float):
        return float.__float__(x)
    if isinstance(x, str):
        return str.__str__(x)
    if isinstance(x, complex):
        return complex(float.__float__(x.real), float.__float__(x.imag))
    if isinstance(x, tuple):
        return tuple(tuple.__iter__(x))
    if isinstance(x, list):
        return list(list.__iter__(x))
    if isinstance(x, dict):
        return dict(dict.items(x))
    if isinstance(x, set):
        return set(set.__iter__(x))
    if isinstance(x, frozenset):
        return frozenset(frozenset.__iter__(x))
    if isinstance(x, (bytes, bytearray)):
        return bytes(x)
    if hasattr(type(x), "__next__") and hasattr(type(x), "__iter__"):
        return _Iterator(x)
    # numpy scalars (np.int64, np.bool_, ...) compare equal to Python numbers in the original
    # protocols; arrays do not reduce to one value and stay unencodable.
    if type(x).__module__ == "numpy" and getattr(x, "ndim", None) == 0 and hasattr(x, "item"):
        value = x.item()
        if type(value) in (bool, int, float, complex, str, bytes):
            return value
    raise Unencodable(f"a value of type {type(x).__module__}.{type(x).__qualname__}")


class _Iterator(list):
    """Materialised iterator items, marked so that they travel as an iterator."""


def _enc_iterator(x) -> str:
    return '{"g":[' + ",".join(map(_enc, x)) + "]}"


def dumps(x) -> str:
    """JSON text for a literal value, ASCII and on one line (JSON escapes newlines in strings)."""
    return _enc(x)


def _hook(obj):
    if len(obj) != 1:
        raise ValueError("not a literal: an object with more than one key")
    (tag, value), = obj.items()
    if tag not in _TAGS:
        raise ValueError(f"not a literal: unknown tag {tag!r}")
    if tag == "i":
        if not isinstance(value, str):
            raise ValueError("not a literal: big int must be a hex string")
        return int(value, 16)  # base 16 is exempt from int's max-digits limit
    if tag in ("b", "B"):
        if not isinstance(value, str):
            raise ValueError("not a literal: bytes must be base64 text")
        raw = base64.b64decode(value.encode("ascii"), validate=True)
        return raw if tag == "b" else bytearray(raw)
    if not isinstance(value, list):
        raise ValueError(f"not a literal: tag {tag!r} needs a list")
    if tag == "t":
        return tuple(value)
    if tag == "g":
        return iter(value)
    if tag == "r":
        if len(value) != 3 or not all(type(v) is int for v in value):
            raise ValueError("not a literal: range needs [start, stop, step]")
        return range(*value)
    if tag == "k":
        return dict.fromkeys(value).keys()
    if tag == "v":
        return dict(enumerate(value)).values()
    if tag == "I":
        if not all(isinstance(p, tuple) and len(p) == 2 for p in value):
            raise ValueError("not a literal: items need (key, value) pairs")
        return {k: v for k, v in value}.items()
    if tag == "s":
        return set(value)  # unhashable members raise TypeError: not a valid value
    if tag == "f":
        return frozenset(value)
    if tag == "c":
        if len(value) != 2 or not all(type(v) in (int, float) for v in value):
            raise ValueError("not a literal: complex needs [real, imag]")
        return complex(value[0], value[1])
    if not all(isinstance(p, list) and len(p) == 2 for p in value):
        raise ValueError("not a literal: dict needs [key, value] pairs")
    return {k: v for k, v in value}


def loads(text: str):
    """Value from `dumps` text. Raises ValueError/TypeError/RecursionError on anything else."""
    return json.loads(text, object_hook=_hook)
