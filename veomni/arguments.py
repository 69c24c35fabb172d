"""Run configuration: ``Arguments`` (model / data / train / infer) and the strict parser.

    from veomni.arguments import Arguments, parse_args, save_yaml
    args = parse_args(Arguments)            # argv: [CONFIG.yaml] [--train.lr=3e-4 ...]
    args.train.resolve_batch(dp_size)       # -> grad accumulation steps
    save_yaml(args, f"{args.train.output_dir}/resolved_config.yaml")

The machinery is in ``veomni/config/parser.py``, the fields in ``veomni/config/schema.py``;
docs/config.md explains precedence, strictness and how to add a field or a group.
"""

from veomni.config.help import format_help
from veomni.config.parser import (
    ConfigError,
    cfg_field,
    from_dict,
    leaf_paths,
    load_yaml,
    parse_args,
    save_yaml,
    to_dict,
)
from veomni.config.schema import (
    Arguments,
    AttnImpl,
    AttnMode,
    DataArgs,
    InferArgs,
    ModelArgs,
    SamplerAlg,
    TrainArgs,
)

__all__ = [
    "Arguments", "AttnImpl", "AttnMode", "ConfigError", "DataArgs", "InferArgs", "ModelArgs",
    "SamplerAlg", "TrainArgs", "cfg_field", "format_help", "from_dict", "leaf_paths", "load_yaml",
    "parse_args", "save_yaml", "to_dict",
]
