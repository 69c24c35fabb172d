"""Tests for the strict config system (veomni/arguments.py, veomni/config/)."""

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest

from veomni.arguments import (
    Arguments,
    ConfigError,
    InferArgs,
    TrainArgs,
    cfg_field,
    format_help,
    from_dict,
    leaf_paths,
    load_yaml,
    parse_args,
    save_yaml,
    to_dict,
)

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(argv: list[str], root: type = Arguments) -> str:
    with pytest.raises(ConfigError) as info:
        parse_args(root, argv)
    return str(info.value)


# ----------------------------------------------------------------------------- recipe-style extensions
@dataclass
class OptimArgs:
    betas: list[float] = cfg_field([0.9, 0.95], help="Adam betas.")
    eps: float = cfg_field(1e-8, help="Adam eps.")


@dataclass
class RecipeTrainArgs(TrainArgs):
    repa_weight: float = cfg_field(0.5, help="Weight of the representation-alignment loss.")
    optim: OptimArgs = cfg_field(default_factory=OptimArgs, help="Nested optimizer group.")


@dataclass
class TeacherArgs:
    teacher_path: str = field(metadata={"help": "Teacher checkpoint (required)."})
    layers: dict[str, int] = cfg_field({}, help="student layer name -> teacher layer index.")
    mode: Literal["mse", "cos"] = cfg_field("cos", help="Alignment distance.")
    scale: Optional[float] = cfg_field(None, help="Optional scale.")
    gate: Optional[Literal["on", "off", "none"]] = cfg_field(None, help="Choices YAML would misread.")


@dataclass
class RecipeArguments(Arguments):
    train: RecipeTrainArgs = cfg_field(default_factory=RecipeTrainArgs, help="Training + REPA.")
    teacher: Optional[TeacherArgs] = cfg_field(None, help="Teacher model; none = no alignment loss.")


@dataclass
class NeedsTeacher:
    teacher: TeacherArgs = field(metadata={"help": "no default: the group itself is required"})


@dataclass
class LambdaDefaults(Arguments):
    train: TrainArgs = cfg_field(default_factory=lambda: TrainArgs(lr=1e-5), help="changes a default the wrong way")


# ----------------------------------------------------------------------------- basics and sources
def test_defaults_and_derived_values():
    args = parse_args(Arguments, [])
    assert args.train.lr == 1e-4 and args.model.attn_mode == "bidirectional"
    assert args.infer.steps == args.infer.max_new_tokens == 128
    args = parse_args(Arguments, ["--model.model_path=/m", "--infer.max_new_tokens=64"])
    assert args.model.tokenizer_path == "/m"  # defaults to model_path
    assert args.infer.steps == 64
    assert parse_args(Arguments, ["--model.model_path=/m", "--model.tokenizer_path=/t"]).model.tokenizer_path == "/t"


def test_cli_beats_yaml_and_yaml_beats_defaults(tmp_path):
    cfg = write(tmp_path, "train:\n  lr: 3.0e-4\n  seed: 7\nmodel:\n  attn_impl: eager\n")
    args = parse_args(Arguments, [cfg, "--train.lr=5e-5", "--train.seed", "9"])
    assert args.train.lr == 5e-5 and args.train.seed == 9
    assert args.model.attn_impl == "eager"  # from YAML, untouched by CLI
    assert args.train.micro_batch_size == 1  # default
    # flags may come before the YAML file; the last of repeated flags wins (argparse convention)
    args = parse_args(Arguments, ["--train.seed=1", cfg, "--train.seed=2"])
    assert args.train.seed == 2


def test_empty_yaml_and_empty_group(tmp_path):
    assert parse_args(Arguments, [write(tmp_path, "")]) == Arguments()
    assert parse_args(Arguments, [write(tmp_path, "train:\n  # lr: 1\n", "b.yaml")]) == Arguments()


# ----------------------------------------------------------------------------- strictness
def test_unknown_key_in_yaml_names_path_file_and_suggestion(tmp_path):
    cfg = write(tmp_path, "train:\n  lr: 1.0e-4\n  micro_batch_sise: 2\n")
    msg = error_of([cfg])
    assert "'micro_batch_sise'" in msg and "'train.micro_batch_sise'" in msg
    assert f"YAML file '{cfg}'" in msg
    assert "did you mean 'train.micro_batch_size'?" in msg


def test_unknown_key_deeply_nested_in_yaml(tmp_path):
    cfg = write(tmp_path, "train:\n  optim:\n    betaz: [0.9, 0.99]\n")
    msg = error_of([cfg], RecipeArguments)
    assert "'train.optim.betaz'" in msg and "did you mean 'train.optim.betas'?" in msg
    assert "YAML file" in msg


def test_unknown_key_on_cli_names_flag_and_suggestion():
    msg = error_of(["--train.lrr=1e-3"])
    assert "'train.lrr'" in msg and "the command line (--train.lrr=1e-3)" in msg
    assert "did you mean 'train.lr'?" in msg
    msg = error_of(["--model.attn_implementation", "sdpa"])
    assert "'model.attn_implementation'" in msg and "did you mean 'model.attn_impl'?" in msg


def test_key_in_wrong_group_suggests_the_right_group(tmp_path):
    assert "did you mean 'train.lr'?" in error_of([write(tmp_path, "model:\n  lr: 1\n")])
    assert "did you mean 'train.lr'?" in error_of(["--lr=1"])
    assert "did you mean 'train.seed' or 'infer.seed'?" in error_of(["--seed=1"])
    msg = error_of(["--bogus=1"])
    assert "valid keys there: model, data, train, infer" in msg


def test_unknown_key_in_cli_group_mapping_is_attributed_to_cli():
    msg = error_of(["--train.optim={betas: [0.9, 0.9], epz: 1}"], RecipeArguments)
    assert "'train.optim.epz'" in msg and "command line" in msg and "'train.optim.eps'" in msg


def test_bad_int_messages():
    msg = error_of(["--train.micro_batch_size=abc"])
    assert "'train.micro_batch_size'" in msg and "an int" in msg and "'abc'" in msg and "command line" in msg
    assert "not a whole number" in error_of(["--train.micro_batch_size=2.5"])
    assert "an int" in error_of(["--train.seed=true"])  # a bool is not a count


def test_bad_literal_message_lists_choices_and_suggests(tmp_path):
    msg = error_of([write(tmp_path, "model:\n  attn_impl: sdp\n")])
    assert "'model.attn_impl'" in msg and "'sdp'" in msg
    assert "'sdpa', 'eager', 'flex', 'flash_attention_2'" in msg and "did you mean 'sdpa'?" in msg
    assert "YAML file" in msg


def test_bad_bool_and_bad_float_messages():
    msg = error_of(["--train.use_wandb=maybe"])
    assert "'train.use_wandb'" in msg and "a bool" in msg and "'maybe'" in msg
    msg = error_of(["--train.lr=fast"])
    assert "'train.lr'" in msg and "a float" in msg and "'fast'" in msg


def test_str_field_rejects_yaml_number_but_keeps_cli_text(tmp_path):
    assert "quote" in error_of([write(tmp_path, "data:\n  text_key: 123\n")])
    assert parse_args(Arguments, ["--data.text_key=123"]).data.text_key == "123"


def test_missing_required_field_is_named():
    with pytest.raises(ConfigError, match=r"missing required config field\(s\): teacher\.teacher_path"):
        from_dict(NeedsTeacher, {"teacher": {"mode": "mse"}})
    assert from_dict(NeedsTeacher, {"teacher": {"teacher_path": "x"}}).teacher.teacher_path == "x"


def test_bad_command_line_shapes(tmp_path):
    assert "needs a value" in error_of(["--train.max_steps"])
    assert "second positional" in error_of(["a.yaml", "b.yaml"])
    assert "unexpected argument '-x'" in error_of(["-x"])
    assert "config file not found" in error_of([str(tmp_path / "nope.yaml")])
    assert "not a group" in error_of(["--train.lr.x=1"])
    assert "is a group" in error_of(["--train=3"])
    assert "must hold a mapping" in error_of([write(tmp_path, "- a\n- b\n")])
    assert "needs a mapping" in error_of([write(tmp_path, "train: 5\n", "g.yaml")])


# ----------------------------------------------------------------------------- value parsing
@pytest.mark.parametrize("text,expected", [("true", True), ("false", False), ("1", True), ("0", False),
                                           ("yes", True), ("no", False), ("True", True), ("NO", False)])
def test_bool_spellings(text, expected):
    assert parse_args(Arguments, [f"--train.use_wandb={text}"]).train.use_wandb is expected
    assert parse_args(Arguments, ["--train.use_wandb", text]).train.use_wandb is expected


def test_bare_bool_flag_means_true_and_does_not_eat_the_yaml(tmp_path):
    cfg = write(tmp_path, "train:\n  seed: 3\n")
    args = parse_args(Arguments, ["--train.use_wandb", cfg, "--model.gradient_checkpointing"])
    assert args.train.use_wandb and args.model.gradient_checkpointing and args.train.seed == 3


def test_numbers_from_yaml_and_cli(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string; float fields must still accept it.
    args = parse_args(Arguments, [write(tmp_path, "train:\n  lr: 1e-4\n  max_steps: 1e3\n  weight_decay: 0\n")])
    assert args.train.lr == pytest.approx(1e-4) and isinstance(args.train.lr, float)
    assert args.train.max_steps == 1000 and isinstance(args.train.max_steps, int)
    assert args.train.weight_decay == 0.0 and isinstance(args.train.weight_decay, float)
    assert parse_args(Arguments, ["--train.lr", "-0"]).train.lr == 0.0


def test_list_parsing():
    assert parse_args(Arguments, ["--train.betas=[0.8,0.9]"]).train.betas == [0.8, 0.9]
    assert parse_args(Arguments, ["--train.betas=0.7, 0.75"]).train.betas == [0.7, 0.75]
    assert parse_args(Arguments, ["--train.freeze=embed_tokens,lm_head"]).train.freeze == ["embed_tokens", "lm_head"]
    assert parse_args(Arguments, ["--train.freeze=embed"]).train.freeze == ["embed"]
    assert parse_args(Arguments, ["--train.freeze=[]"]).train.freeze == []
    assert parse_args(Arguments, ["--train.freeze="]).train.freeze == []
    assert parse_args(Arguments, ['--train.freeze=["a{1,2}"]']).train.freeze == ["a{1,2}"]
    msg = error_of(["--train.betas=0.9,abc"])
    assert "'train.betas[1]'" in msg and "a float" in msg and "command line" in msg
    assert "train.betas needs 2 values" in error_of(["--train.betas=[0.9]"])
    assert "not a valid regex" in error_of(["--train.freeze=[\"(\"]"])


def test_dict_optional_and_literal_in_extended_root(tmp_path):
    assert parse_args(RecipeArguments, []).teacher is None
    assert parse_args(RecipeArguments, ["--teacher.teacher_path=/t", "--teacher=none"]).teacher is None
    args = parse_args(RecipeArguments, ["--teacher.layers={layers.3: 2, layers.7: 5}", "--teacher.scale=0.5",
                                        "--teacher.mode", "mse", "--teacher.teacher_path=/t"])
    assert args.teacher.layers == {"layers.3": 2, "layers.7": 5}
    assert args.teacher.scale == 0.5 and args.teacher.mode == "mse"
    for none in ("none", "null", "None"):
        argv = ["--teacher.teacher_path=/t", "--teacher.scale=0.5", f"--teacher.scale={none}"]
        assert parse_args(RecipeArguments, argv).teacher.scale is None
    assert parse_args(Arguments, [write(tmp_path, "train:\n  max_steps: null\n")]).train.max_steps is None
    assert parse_args(Arguments, ["--infer.top_k=none"]).infer.top_k is None
    assert "teacher.teacher_path" in error_of(["--teacher.mode=mse"], RecipeArguments)
    msg = error_of(["--teacher.teacher_path=/t", "--teacher.layers={a: x}"], RecipeArguments)
    assert "'teacher.layers.a'" in msg and "an int" in msg
    assert "a mapping" in error_of(["--teacher.teacher_path=/t", "--teacher.layers=[1]"], RecipeArguments)


# ----------------------------------------------------------------------------- help
def test_help_exits_zero_and_lists_every_field(capsys):
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as info:
            parse_args(Arguments, ["--train.lr=1", flag])
        assert info.value.code == 0
        out = capsys.readouterr().out
        for path in leaf_paths(Arguments):
            assert f"--{path} " in out, path
    assert "--model.attn_impl {sdpa,eager,flex,flash_attention_2}   [default: sdpa]" in out
    assert "--train.max_steps int | none   [default: null]" in out
    assert "--train.betas list[float]   [default: [0.9, 0.95]]" in out
    assert "Peak learning rate." in out
    assert out.index("model (ModelArgs)") < out.index("data (DataArgs)") < out.index("train (TrainArgs)")


def test_help_of_extended_root_and_required_default():
    text = format_help(RecipeArguments) + format_help(NeedsTeacher)
    assert "--train.repa_weight float" in text and "--train.optim.betas list[float]" in text
    assert "--teacher.layers dict[str, int]" in text and "student layer name -> teacher layer index." in text
    assert "--teacher.teacher_path str   [default: REQUIRED]" in text


def test_every_builtin_field_has_help_text():
    import dataclasses

    from veomni.arguments import DataArgs, ModelArgs

    for cls in (Arguments, ModelArgs, DataArgs, TrainArgs, InferArgs):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


# ----------------------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path):
    args = parse_args(Arguments, [
        "--model.model_path=/models/smol", "--model.attn_mode=block_causal", "--model.block_size=32",
        "--train.lr=3e-5", "--train.betas=[0.9,0.999]", "--train.freeze=embed", "--train.max_steps=10",
        "--train.global_batch_size=8", "--infer.top_p=0.9", "--infer.alg=threshold", "--infer.threshold=0.9",
        "--data.text_key=123",
    ])
    args.train.resolve_batch(2)
    path = save_yaml(args, tmp_path / "run" / "resolved_config.yaml")
    assert load_yaml(path) == args
    assert parse_args(Arguments, [str(path)]) == args
    assert to_dict(load_yaml(path)) == to_dict(args)
    assert "grad_accum_steps" not in path.read_text()  # derived state is not a config key


def test_round_trip_extended_root(tmp_path):
    args = parse_args(RecipeArguments, ["--train.optim.betas=[0.5,0.6]", "--train.repa_weight=2",
                                        "--teacher.layers={a: 1}", "--teacher.teacher_path=/t"])
    assert args.train.optim.betas == [0.5, 0.6] and args.train.repa_weight == 2.0
    path = save_yaml(args, tmp_path / "r.yaml")
    assert load_yaml(path, RecipeArguments) == args
    # the base root does not know the recipe's keys: strictness catches a config run by the wrong entry point
    assert "'teacher'" in error_of([str(path)])


def test_cli_group_mapping_merges_with_yaml(tmp_path):
    cfg = write(tmp_path, "train:\n  optim:\n    eps: 1.0e-6\n")
    args = parse_args(RecipeArguments, [cfg, "--train.optim={betas: [0.1, 0.2]}"])
    assert args.train.optim.eps == 1e-6 and args.train.optim.betas == [0.1, 0.2]


# ----------------------------------------------------------------------------- __post_init__ checks
def test_block_causal_needs_block_size():
    msg = error_of(["--model.attn_mode=block_causal"])
    assert "model.block_size" in msg and "--model.attn_mode=block_causal" in msg
    assert parse_args(Arguments, ["--model.attn_mode=block_causal", "--model.block_size=16"]).model.block_size == 16
    assert "only applies" in error_of(["--model.block_size=16"])
    assert ">= 1" in error_of(["--model.attn_mode=block_causal", "--model.block_size=0"])


def test_other_cross_checks():
    assert "needs model.attn_mode='causal'" in error_of(["--train.objective=ar"])
    assert parse_args(Arguments, ["--train.objective=ar", "--model.attn_mode=causal"]).train.objective == "ar"
    assert "infer.threshold" in error_of(["--infer.alg=threshold"])
    assert "not both" in error_of(["--data.eval_path=e.jsonl", "--data.eval_split_ratio=0.1"])
    assert "train.noise_eps must be in (0.0, 1.0)" in error_of(["--train.noise_eps=0"])
    with pytest.raises(ConfigError, match="model.model_path is not set"):
        Arguments().model.require_model_path()


def test_resolve_batch_math():
    train = TrainArgs(micro_batch_size=2, global_batch_size=16)
    assert train.resolve_batch(4) == 2 and train.grad_accum_steps == 2
    assert train.resolve_batch(1) == 8
    auto = TrainArgs(micro_batch_size=3)
    assert auto.resolve_batch(4) == 1 and auto.global_batch_size == 12
    assert auto.resolve_batch(2) == 1 and auto.global_batch_size == 6  # unset global follows dp


def test_resolve_batch_errors():
    train = TrainArgs(micro_batch_size=2, global_batch_size=10)
    with pytest.raises(ConfigError) as info:
        train.resolve_batch(4)
    msg = str(info.value)
    assert "train.global_batch_size=10" in msg and "2 * 4 = 8" in msg and "multiple of 8" in msg
    with pytest.raises(ConfigError, match="resolve_batch"):
        TrainArgs().grad_accum_steps
    with pytest.raises(ConfigError, match="dp_size"):
        TrainArgs().resolve_batch(0)


# ----------------------------------------------------------------------------- every shipped config
def _root_for(path: Path) -> type:
    """A config that needs a recipe root says so on its first line: `# veomni-root: pkg.module:Class`."""
    first = path.read_text().split("\n", 1)[0]
    if not first.startswith("# veomni-root:"):
        return Arguments
    module, _, name = first.split(":", 1)[1].strip().partition(":")
    return getattr(importlib.import_module(module), name)


def test_all_configs_parse():
    files = sorted((REPO / "configs").glob("**/*.yaml")) + sorted((REPO / "configs").glob("**/*.yml"))
    failures = []
    for path in files:
        try:
            parse_args(_root_for(path), [str(path)])
        except Exception as exc:  # collect all, report all: one bad file should not hide another
            failures.append(f"{path.relative_to(REPO)}: {type(exc).__name__}: {exc}")
    print(f"parsed {len(files) - len(failures)}/{len(files)} files under configs/")
    assert not failures, "\n".join(failures)


def test_root_declaration_comment(tmp_path):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(f"# veomni-root: {__name__}:RecipeArguments\ntrain:\n  repa_weight: 1.5\n")
    assert _root_for(cfg) is RecipeArguments
    assert parse_args(_root_for(cfg), [str(cfg)]).train.repa_weight == 1.5


def test_configs_parse_is_strict(tmp_path):
    """The check above is only as good as parse_args on a file: a typo there must fail."""
    bad = write(tmp_path, "train:\n  learning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError, match="train.learning_rate"):
        parse_args(_root_for(Path(bad)), [bad])


def test_from_dict_matches_parse(tmp_path):
    data: dict[str, Any] = {"train": {"lr": "2e-4", "betas": [0.9, 0.9]}, "model": {"dtype": "bfloat16"}}
    args = from_dict(Arguments, data)
    assert args.train.lr == 2e-4 and args.model.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="from a Python dict"):
        from_dict(Arguments, {"train": {"lrr": 1}})


def test_group_default_factory_with_changed_defaults_is_refused():
    assert parse_args(LambdaDefaults, []).train.lr == 1e-5  # untouched group: the factory is used
    msg = error_of(["--train.seed=3"], LambdaDefaults)
    assert "LambdaDefaults.train" in msg and "lr" in msg and "subclass TrainArgs" in msg


def test_literal_choices_yaml_would_misread_on_cli():
    # YAML reads `on` as True and `none` could mean None: an exact choice must win on the CLI.
    def gate(text):
        return parse_args(RecipeArguments, ["--teacher.teacher_path=/t", f"--teacher.gate={text}"]).teacher.gate
    assert gate("on") == "on" and gate("off") == "off"
    assert gate("none") == "none" and gate("null") is None
    assert "one of 'on', 'off', 'none'" in error_of(["--teacher.teacher_path=/t", "--teacher.gate=maybe"],
                                                     RecipeArguments)
