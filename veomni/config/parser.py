"""Strict config machinery: nested dataclasses <- YAML file <- ``--group.field=value`` flags.

Works for any dataclass root (``Arguments`` or a recipe's extension of it). The pipeline:

1. ``argv`` is split into an optional YAML path (the one positional) and ``--dotted.key`` flags.
2. The YAML mapping is loaded; each flag is checked against the schema and written into that
   mapping at its dotted path (command line wins; dataclass groups are deep-merged).
3. The merged mapping is turned into dataclass instances field by field. Every value is type
   checked and coerced; unknown keys, bad types and missing required fields raise ``ConfigError``
   naming the dotted path, the value, where it came from and what would be accepted.

Command-line values stay raw text (``_Raw``) until their target type is known, so a ``str`` field
keeps ``--data.text_key=123`` as ``"123"`` and ``1e-4`` becomes a float even though YAML 1.1
(PyYAML) reads ``1e-4`` as a string.
"""

import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

_MISSING = dataclasses.MISSING
_NONE_WORDS = ("none", "null", "~")
_TRUE_WORDS = ("true", "yes", "y", "on", "1")
_FALSE_WORDS = ("false", "no", "n", "off", "0")


class ConfigError(ValueError):
    """A config value or key is wrong. The message says which, where from, and what would work."""


def cfg_field(default: Any = _MISSING, *, help: str, **kwargs: Any) -> Any:
    """``dataclasses.field`` with mandatory help text (shown by ``--help``).

    Mutable defaults (list/dict/set) are copied per instance via ``default_factory`` so that
    ``betas: list[float] = cfg_field([0.9, 0.95], help=...)`` is safe to write.
    """
    metadata = {"help": help, **kwargs.pop("metadata", {})}
    if isinstance(default, (list, dict, set)):
        frozen = default
        return dataclasses.field(default_factory=lambda: type(frozen)(frozen), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


@dataclasses.dataclass
class _Raw:
    """An unparsed command-line value; parsed once the target type is known."""

    text: str


class _Context:
    """Where each dotted path's value came from, for error messages."""

    def __init__(self, root_cls: type, default_source: str):
        self.root_cls = root_cls
        self.default_source = default_source
        self.sources: dict[str, str] = {}

    def source(self, path: str) -> str:
        """The source of ``path`` or of its closest recorded ancestor (``a.b[2]`` -> ``a.b`` -> ``a``)."""
        cuts = [len(path)] + [i for i in range(len(path) - 1, 0, -1) if path[i] in ".["]
        for cut in cuts:
            found = self.sources.get(path[:cut])
            if found is not None:
                return found
        return self.default_source

    def sources_under(self, path: str) -> list[str]:
        """Every distinct source that contributed to the group at ``path`` (for __post_init__ errors)."""
        found = [] if self.default_source == "the defaults" else [self.default_source]
        for key, source in self.sources.items():
            if (not path or key == path or key.startswith(path + ".")) and source not in found:
                found.append(source)
        return found


# ----------------------------------------------------------------------------- type helpers
def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``Optional[X]`` -> ``(X, True)``; a union of several non-None types stays a union."""
    if not _is_union(tp):
        return tp, False
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    allows_none = len(args) < len(typing.get_args(tp))
    inner = args[0] if len(args) == 1 else Union[tuple(args)]
    return inner, allows_none


def _field_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as exc:  # string annotations naming a class local to a function
        raise ConfigError(f"cannot resolve the field types of {cls.__name__} ({exc}); define config "
                          f"dataclasses at module level") from None


def type_name(tp: Any) -> str:
    """Readable type for help and error messages: ``int | None``, ``{sdpa,eager}``, ``list[float]``."""
    if tp is type(None):
        return "none"
    if tp is Any:
        return "any"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if _is_union(tp):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, tuple, dict, set):
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    return getattr(tp, "__name__", str(tp))


def _short(value: Any) -> str:
    text = repr(value.text if isinstance(value, _Raw) else value)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------- coercion
def _bad(path: str, value: Any, expected: str, ctx: _Context, hint: str = "") -> ConfigError:
    got = value.text if isinstance(value, _Raw) else value
    kind = "" if isinstance(value, _Raw) else f" ({type(got).__name__})"
    msg = f"'{path}' expects {expected}, got {_short(got)}{kind} from {ctx.source(path)}"
    return ConfigError(msg + (f"; {hint}" if hint else ""))


def _parse_raw(raw: _Raw, tp: Any, path: str, ctx: _Context) -> Any:
    """Turn command-line text into a Python value shaped for ``tp`` (not yet type checked)."""
    text = raw.text
    inner, allows_none = _strip_optional(tp)
    if typing.get_origin(inner) is Literal:
        for choice in typing.get_args(inner):
            if text == str(choice):
                return choice
    if allows_none and text.strip().lower() in _NONE_WORDS:
        return None
    if inner is str:
        return text
    if typing.get_origin(inner) in (list, tuple, set) and not text.lstrip().startswith("["):
        # Comma lists: --train.freeze=embed,lm_head. A regex containing a comma needs YAML syntax:
        # --train.freeze='["a{1,2}"]'.
        return [_Raw(part.strip()) for part in text.split(",")] if text.strip() else []
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _bad(path, raw, type_name(tp), ctx, f"it is not valid YAML ({exc.problem})") from None


def coerce(value: Any, tp: Any, path: str, ctx: _Context) -> Any:
    """Check ``value`` against type ``tp`` and convert it (str->float, list->tuple, mapping->dataclass)."""
    if isinstance(value, _Raw):
        value = _parse_raw(value, tp, path, ctx)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build(tp, value, path, ctx)
    inner, allows_none = _strip_optional(tp)
    if allows_none:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS
                             and not _literal_accepts(inner, value)):
            return None
        return coerce(value, inner, path, ctx)
    if _is_union(tp):
        for arm in typing.get_args(tp):
            try:
                return coerce(value, arm, path, ctx)
            except ConfigError:
                continue
        raise _bad(path, value, type_name(tp), ctx)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return _coerce_literal(value, tp, path, ctx)
    if tp is bool:
        return _coerce_bool(value, path, ctx)
    if tp is int:
        return _coerce_int(value, path, ctx)
    if tp is float:
        return _coerce_float(value, path, ctx)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(path, value, "a string", ctx, "quote the value in YAML, e.g. \"123\"")
    if origin in (list, tuple, set) or tp in (list, tuple, set):
        return _coerce_sequence(value, tp, path, ctx)
    if origin is dict or tp is dict:
        return _coerce_dict(value, tp, path, ctx)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _bad(path, value, type_name(tp), ctx)


def _literal_accepts(tp: Any, value: Any) -> bool:
    return typing.get_origin(tp) is Literal and value in typing.get_args(tp)


def _coerce_literal(value: Any, tp: Any, path: str, ctx: _Context) -> Any:
    choices = typing.get_args(tp)
    for choice in choices:
        if value == choice and type(value) is type(choice):
            return choice
    listed = ", ".join(repr(c) for c in choices)
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f"did you mean {close[0]!r}?" if close else ""
    raise _bad(path, value, f"one of {listed}", ctx, hint)


def _coerce_bool(value: Any, path: str, ctx: _Context) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    raise _bad(path, value, "a bool (true/false/yes/no/1/0)", ctx)


def _coerce_int(value: Any, path: str, ctx: _Context) -> int:
    if isinstance(value, bool):  # bool is an int subclass: `true` for a count is a typo, not 1
        raise _bad(path, value, "an int", ctx)
    if isinstance(value, int):
        return value
    number = value
    if isinstance(value, str):
        try:
            return int(value.strip().replace("_", ""))
        except ValueError:
            try:
                number = float(value)  # "1e5": PyYAML reads it as a string
            except ValueError:
                raise _bad(path, value, "an int", ctx) from None
    if isinstance(number, float) and number.is_integer():
        return int(number)
    raise _bad(path, value, "an int", ctx, "it is not a whole number" if isinstance(number, float) else "")


def _coerce_float(value: Any, path: str, ctx: _Context) -> float:
    if isinstance(value, bool):
        raise _bad(path, value, "a float", ctx)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())  # PyYAML leaves "1e-4" (no dot) as a string
        except ValueError:
            pass
    raise _bad(path, value, "a float", ctx)


def _coerce_sequence(value: Any, tp: Any, path: str, ctx: _Context) -> Any:
    origin = typing.get_origin(tp) or tp
    args = typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise _bad(path, value, f"a list ({type_name(tp)})", ctx, "write [a, b] or a,b")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise _bad(path, value, f"{len(args)} items ({type_name(tp)})", ctx)
        return tuple(coerce(v, a, f"{path}[{i}]", ctx) for i, (v, a) in enumerate(zip(value, args)))
    item_tp = args[0] if args else Any
    items = [coerce(v, item_tp, f"{path}[{i}]", ctx) for i, v in enumerate(value)]
    return origin(items)


def _coerce_dict(value: Any, tp: Any, path: str, ctx: _Context) -> dict:
    if not isinstance(value, dict):
        raise _bad(path, value, f"a mapping ({type_name(tp)})", ctx, "write {key: value}")
    key_tp, val_tp = typing.get_args(tp) or (Any, Any)
    return {coerce(k, key_tp, f"{path}.<key>", ctx): coerce(v, val_tp, f"{path}.{k}", ctx) for k, v in value.items()}


# ----------------------------------------------------------------------------- schema walking
def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_dict(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def _group_type(tp: Any) -> type | None:
    """The dataclass a field holds (also through Optional), else None."""
    inner, _ = _strip_optional(tp)
    return inner if dataclasses.is_dataclass(inner) else None


def leaf_paths(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted path under ``cls`` (groups are expanded, not listed)."""
    out = []
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        sub = _group_type(types_[f.name])
        out.extend(leaf_paths(sub, _join(prefix, f.name)) if sub else [_join(prefix, f.name)])
    return out


def _unknown_key(cls: type, key: str, path: str, source: str, ctx: _Context) -> ConfigError:
    """Error for a key ``cls`` lacks, with the closest valid key (sibling first, then anywhere)."""
    full = _join(path, key)
    siblings = [f.name for f in dataclasses.fields(cls) if f.init]
    close = difflib.get_close_matches(key, siblings, n=1)
    suggestions = [_join(path, close[0])] if close else []
    if not suggestions:
        # Right name, wrong group (e.g. `model.lr` or a flat `--lr`): match on the last component;
        # a name in several groups (`seed`) lists them all.
        everywhere = leaf_paths(ctx.root_cls)
        near = difflib.get_close_matches(key, {p.rsplit(".", 1)[-1] for p in everywhere}, n=1, cutoff=0.75)
        suggestions = [p for p in everywhere if near and p.rsplit(".", 1)[-1] == near[0]]
    where = f"'{path}' ({cls.__name__})" if path else f"the top level ({cls.__name__})"
    msg = f"unknown config key '{key}' at '{full}' from {source}: {where} has no such field"
    if suggestions:
        msg += "; did you mean " + " or ".join(f"'{s}'" for s in suggestions) + "?"
    else:
        msg += f"; valid keys there: {', '.join(siblings)}"
    return ConfigError(msg + " (run with --help to list every field)")


def resolve_path(root_cls: type, dotted: str, source: str, ctx: _Context) -> Any:
    """Check that ``dotted`` names a field under ``root_cls``; return that field's type."""
    cls, path, tp = root_cls, "", None
    keys = dotted.split(".")
    for i, key in enumerate(keys):
        if cls is None:
            is_dict = _is_dict(_strip_optional(tp)[0])
            if is_dict and i == len(keys) - 1:
                # One entry of a mapping field (--model.ops.moe_experts=loop): _set_path writes it
                # into the mapping the YAML gave, whose other entries stay.
                return (typing.get_args(_strip_optional(tp)[0]) or (Any, Any))[1]
            fix = f"; set it whole: --{path}='{{{'.'.join(keys[i:])}: ...}}'" if is_dict else ""
            raise ConfigError(f"'{dotted}' from {source} goes inside '{path}', which is a "
                              f"{type_name(tp)} value, not a group{fix}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        if key not in names or not names[key].init:
            raise _unknown_key(cls, key, path, source, ctx)
        tp = _field_types(cls)[key]
        path = _join(path, key)
        cls = _group_type(tp)
    return tp


# ----------------------------------------------------------------------------- building
def build(cls: type, data: Any, path: str, ctx: _Context) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, strictly (see module docstring)."""
    if data is None:  # `train:` with every key commented out
        data = {}
    if not isinstance(data, dict):
        where = f"'{path}'" if path else "the config root"
        raise ConfigError(f"{where} is a group ({cls.__name__}) and needs a mapping of its fields, "
                          f"got {_short(data)} from {ctx.source(path)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if not isinstance(key, str) or key not in fields or not fields[key].init:
            raise _unknown_key(cls, str(key), path, ctx.source(_join(path, str(key))), ctx)
    types_ = _field_types(cls)
    kwargs, missing = {}, []
    for name, f in fields.items():
        if not f.init:
            continue
        sub_path = _join(path, name)
        if name in data:
            _check_group_default(cls, f, types_[name])
            kwargs[name] = coerce(data[name], types_[name], sub_path, ctx)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            missing.append(sub_path)
    if missing:
        raise ConfigError(f"missing required config field(s): {', '.join(missing)}; set them in the "
                          f"YAML file or with --{missing[0]}=VALUE")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        # __post_init__ checks know field names but not where the values came from: add that.
        origin = ", ".join(ctx.sources_under(path)) or "the defaults"
        raise ConfigError(f"{exc} [config from: {origin}]") from None


def _check_group_default(cls: type, f: dataclasses.Field, tp: Any) -> None:
    """Refuse ``train: TrainArgs = field(default_factory=lambda: TrainArgs(lr=1e-5))``.

    A YAML/CLI value for one field of such a group rebuilds it from the class defaults, which
    would silently drop lr=1e-5. Changing a group's defaults needs a subclass of the group."""
    if not dataclasses.is_dataclass(tp) or f.default_factory in (_MISSING, tp):
        return
    custom, plain = to_dict(f.default_factory()), to_dict(tp())
    changed = [k for k in plain if custom.get(k) != plain[k]]
    if changed:
        raise ConfigError(f"{cls.__name__}.{f.name}: its default_factory changes {', '.join(changed)}, which "
                          f"any override of '{f.name}' would drop; subclass {tp.__name__} with those "
                          f"defaults and use default_factory=<the subclass>")


def _set_path(tree: dict, dotted: str, value: Any, ctx: _Context) -> None:
    """Write a command-line value into the YAML tree; a mapping for a group is deep-merged."""
    keys = dotted.split(".")
    node, path = tree, ""
    for key in keys[:-1]:
        path = _join(path, key)
        if node.get(key) is None:
            node[key] = {}
        elif isinstance(node[key], _Raw):  # --m.ops='{a: x}' then --m.ops.b=y: an entry of that mapping
            try:
                node[key] = yaml.safe_load(node[key].text)
            except yaml.YAMLError:
                pass
        if not isinstance(node[key], dict):
            raise ConfigError(f"'{path}' from {ctx.source(path)} must be a mapping (a group or a mapping field), "
                              f"got {_short(node[key])}")
        node = node[key]
    old = node.get(keys[-1])
    if isinstance(value, dict) and isinstance(old, dict):
        _deep_merge(old, value)
    else:
        node[keys[-1]] = value


def _deep_merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _read_yaml(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: '{path}' (the first positional argument must be a YAML file)")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML file '{path}' is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"YAML file '{path}' must hold a mapping of groups, got a {type(data).__name__}")
    return data


def _split_argv(argv: list[str], ctx: _Context) -> tuple[str | None, list[tuple[str, Any, str]]]:
    """-> (YAML path or None, [(dotted key, _Raw value, flag as typed)]). Checks every key."""
    yaml_path, flags, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg.startswith("--") and len(arg) > 2:
            key, eq, value = arg[2:].partition("=")
            typed = arg
            tp = resolve_path(ctx.root_cls, key, f"the command line ({arg})", ctx)
            is_bool = _strip_optional(tp)[0] is bool
            nxt = argv[i] if i < len(argv) else None
            # `--flag value`: a bool flag only takes the next token when it is a bool word, so
            # `--train.use_wandb configs/x.yaml` still reads the YAML file as the positional.
            takes_next = nxt is not None and not nxt.startswith("--") and (
                not is_bool or nxt.strip().lower() in _TRUE_WORDS + _FALSE_WORDS)
            if not eq and takes_next:
                value, typed = nxt, f"{arg} {nxt}"
                i += 1
            elif not eq:
                if not is_bool:
                    raise ConfigError(f"'{key}' from the command line ({arg}) needs a value "
                                      f"({type_name(tp)}): write --{key}=VALUE")
                value = "true"  # bare bool flag
            flags.append((key, _group_value(value, tp, key, typed), typed))
        elif arg.startswith("-") and arg != "-":
            raise ConfigError(f"unexpected argument '{arg}' on the command line; overrides look like "
                              f"--group.field=value (run with --help to list every field)")
        elif yaml_path is None:
            yaml_path = arg
        else:
            raise ConfigError(f"unexpected second positional argument '{arg}' (the YAML file is "
                              f"'{yaml_path}'); overrides look like --group.field=value")
    return yaml_path, flags


def _group_value(text: str, tp: Any, key: str, typed: str) -> Any:
    """A flag that sets a whole group (--train.optim='{lr: 1}') is parsed now so it can be merged."""
    if _group_type(tp) is None:
        return _Raw(text)
    if _strip_optional(tp)[1] and text.strip().lower() in _NONE_WORDS:
        return None  # --recipe.extra=none switches an Optional group off
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"'{key}' from the command line ({typed}) is not valid YAML: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"'{key}' from the command line ({typed}) is a group ({type_name(_group_type(tp))}); "
                          f"give a mapping like '{{field: value}}' or set --{key}.FIELD=VALUE")
    return value


def _default_root() -> type:
    from .schema import Arguments  # lazy: schema imports this module

    return Arguments


def parse_args(root_cls: type | None = None, argv: list[str] | None = None) -> Any:
    """Parse ``[CONFIG.yaml] [--group.field=value | --group.field value | --bool.flag ...]``.

    ``root_cls`` defaults to ``veomni.arguments.Arguments``; ``argv`` to ``sys.argv[1:]``.
    ``-h``/``--help`` prints every field and exits 0. Raises ``ConfigError`` on any bad input.
    """
    root_cls = root_cls or _default_root()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        from .help import format_help  # lazy: help imports this module

        print(format_help(root_cls))
        raise SystemExit(0)
    ctx = _Context(root_cls, "the defaults")
    yaml_path, flags = _split_argv(argv, ctx)
    tree = {}
    if yaml_path:
        ctx.default_source = f"YAML file '{yaml_path}'"
        tree = _read_yaml(yaml_path)
    for key, value, typed in flags:
        _set_path(tree, key, value, ctx)
        ctx.sources[key] = f"the command line ({typed})"
    return build(root_cls, tree, "", ctx)


def from_dict(root_cls: type, data: dict, source: str = "a Python dict") -> Any:
    """Build ``root_cls`` from a nested mapping with the same strict checks as ``parse_args``."""
    return build(root_cls, data, "", _Context(root_cls, source))


def load_yaml(path: str | Path, root_cls: type | None = None) -> Any:
    """Strictly parse one YAML file (no command line), e.g. a saved ``resolved_config.yaml``."""
    root_cls = root_cls or _default_root()
    return build(root_cls, _read_yaml(str(path)), "", _Context(root_cls, f"YAML file '{path}'"))


# ----------------------------------------------------------------------------- output
def to_dict(obj: Any) -> Any:
    """Plain nested dict/list/scalars of a config (only ``init`` fields: derived state is left out)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple, set)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def save_yaml(args: Any, path: str | Path) -> Path:
    """Write the resolved config; ``load_yaml(path, type(args))`` gives back an equal object."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(args), sort_keys=False, default_flow_style=None))
    return path
