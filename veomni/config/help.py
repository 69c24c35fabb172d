"""``--help`` text: every field of a config root, grouped, with type, default and help."""

import dataclasses
import textwrap

import yaml

from .parser import _MISSING, _field_types, _group_type, _join, _strip_optional, to_dict, type_name


def _default_text(f: dataclasses.Field) -> str:
    """The default as you would type it (YAML flow style: null, true, [0.9, 0.95])."""
    if f.default is not _MISSING:
        value = f.default
    elif f.default_factory is not _MISSING:
        value = to_dict(f.default_factory())
    else:
        return "REQUIRED"
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-4].strip() if text.endswith("\n...") else text


def _help_lines(cls: type, prefix: str, lines: list[str], about: str = "") -> None:
    types_ = _field_types(cls)
    plain, groups = [], []
    for f in dataclasses.fields(cls):
        if f.init:
            (groups if _group_type(types_[f.name]) else plain).append(f)
    if plain:
        title = f"{prefix} ({cls.__name__})" if prefix else f"top level ({cls.__name__})"
        lines.append(f"\n{title}:" + (f" {about}" if about else ""))
        for f in plain:
            path = _join(prefix, f.name)
            lines.append(f"  --{path} {type_name(types_[f.name])}   [default: {_default_text(f)}]")
            help_text = f.metadata.get("help", "")
            if help_text:
                lines.extend(textwrap.wrap(help_text, width=96, initial_indent=" " * 6, subsequent_indent=" " * 6))
    for f in groups:
        about = f.metadata.get("help", "")
        if _strip_optional(types_[f.name])[1]:
            about += f" Optional group [default: {_default_text(f)}]: setting any field enables it."
        _help_lines(_group_type(types_[f.name]), _join(prefix, f.name), lines, about.strip())


def format_help(root_cls: type) -> str:
    """The ``--help`` text: every field, grouped, with type, default and help."""
    lines = [
        "usage: [CONFIG.yaml] [--group.field=VALUE | --group.field VALUE | --group.bool_flag] ...",
        "",
        "Values come from the field defaults, then the YAML file, then the command line (last wins).",
        "Unknown keys are errors. Lists: [1,2] or 1,2. Mappings: '{k: v}'. Optional: none/null.",
    ]
    _help_lines(root_cls, "", lines)
    return "\n".join(lines)
