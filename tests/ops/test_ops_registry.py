"""The op switch `model.ops`: registry, config validation, the command-line form, apply_ops."""
import pytest

from veomni.arguments import Arguments, ConfigError, load_yaml, parse_args, save_yaml
from veomni.ops.registry import OPS, apply_ops, default_ops, resolve_ops

DEFAULTS = default_ops()


def test_registry_choices_match_the_implementations():
    from veomni.ops.gdn import GDN_IMPLS
    from veomni.ops.moe_experts import EXPERT_IMPLS

    assert set(OPS["moe_experts"].choices) == set(EXPERT_IMPLS)
    assert set(OPS["gdn"].choices) == set(GDN_IMPLS)
    from veomni.ops.rms_norm import RMS_NORM_IMPLS
    from veomni.ops.rope import ROPE_IMPLS
    from veomni.ops.swiglu import SWIGLU_IMPLS

    assert OPS["rms_norm"].choices == RMS_NORM_IMPLS and OPS["rope"].choices == ROPE_IMPLS
    assert OPS["swiglu"].choices == SWIGLU_IMPLS
    defaults = default_ops()
    assert defaults["moe_experts"] == "grouped" and defaults["gdn"] == "torch"
    assert defaults["rms_norm"] == defaults["rope"] == defaults["swiglu"] == "eager"
    from veomni.ops.linear_ce import LINEAR_CE_IMPLS

    assert set(OPS["linear_ce"].choices) == set(LINEAR_CE_IMPLS) and defaults["linear_ce"] == "eager"


def test_resolve_fills_defaults_and_names_the_choices():
    assert resolve_ops(None) == resolve_ops({}) == DEFAULTS
    assert resolve_ops({"moe_experts": "loop"}) == {**DEFAULTS, "moe_experts": "loop"}
    with pytest.raises(ValueError, match=r"model.ops.moe_experts='fast' is not one of 'grouped' .*'loop'"):
        resolve_ops({"moe_experts": "fast"})
    with pytest.raises(ValueError, match=r"no op 'moe_expert'; known ops: moe_experts, gdn, .*; did you mean 'moe_experts'"):
        resolve_ops({"moe_expert": "loop"})


def test_config_cli_forms_and_resolved_yaml(tmp_path):
    assert parse_args(Arguments, []).model.ops == DEFAULTS
    assert parse_args(Arguments, ["--model.ops.moe_experts=loop"]).model.ops == {**DEFAULTS, "moe_experts": "loop"}
    assert parse_args(Arguments, ["--model.ops.moe_experts", "loop"]).model.ops == {**DEFAULTS, "moe_experts": "loop"}
    assert parse_args(Arguments, ["--model.ops={moe_experts: loop}"]).model.ops == {**DEFAULTS, "moe_experts": "loop"}
    # A whole mapping then one entry: the entry goes into that mapping; the last flag wins.
    argv = ["--model.ops={moe_experts: loop}", "--model.ops.moe_experts=grouped"]
    assert parse_args(Arguments, argv).model.ops == DEFAULTS
    # YAML gives the mapping, the command line one entry of it.
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  ops:\n    moe_experts: loop\n")
    assert parse_args(Arguments, [str(cfg)]).model.ops == {**DEFAULTS, "moe_experts": "loop"}
    assert parse_args(Arguments, [str(cfg), "--model.ops.moe_experts=grouped"]).model.ops == DEFAULTS
    # An empty YAML mapping still resolves every op, and the saved config names them.
    cfg.write_text("model:\n  ops: {}\n")
    args = parse_args(Arguments, [str(cfg)])
    save_yaml(args, tmp_path / "resolved.yaml")
    import yaml

    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["model"]["ops"] == DEFAULTS
    assert load_yaml(tmp_path / "resolved.yaml") == args


def test_bad_ops_are_config_errors_naming_the_source():
    with pytest.raises(ConfigError, match=r"not one of 'grouped'.*'loop'.*--model.ops.moe_experts=fast"):
        parse_args(Arguments, ["--model.ops.moe_experts=fast"])
    with pytest.raises(ConfigError, match=r"no op 'ropes'; known ops: moe_experts, gdn, .*did you mean 'rope'"):
        parse_args(Arguments, ["--model.ops.ropes=fused"])
    with pytest.raises(ConfigError, match=r"model.ops.rope='fused' is not one of 'eager' .*'triton' .*'liger'"):
        parse_args(Arguments, ["--model.ops.rope=fused"])
    with pytest.raises(ConfigError, match="not a group"):  # one level into a mapping, not two
        parse_args(Arguments, ["--model.ops.moe_experts.x=loop"])
    with pytest.raises(ConfigError, match="expects a mapping"):
        parse_args(Arguments, ["--model.ops=loop"])


def test_apply_ops_sets_every_experts_module_and_logs(caplog):
    import logging

    from transformers import Qwen3MoeConfig

    from veomni.models.registry import build_model
    from veomni.models.transformers.moe import Experts

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                         num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1])
    model = build_model(cfg)
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert len(experts) == 2  # layer 1 is dense
    with caplog.at_level(logging.INFO, logger="veomni"):
        assert apply_ops(model, {"moe_experts": "loop"}) == {**DEFAULTS, "moe_experts": "loop"}
    assert all(m.impl == "loop" for m in experts) and Experts.impl == "grouped"  # the class default is untouched
    assert "moe_experts=loop (2 modules)" in caplog.text
    apply_ops(model, None)
    assert all(m.impl == "grouped" for m in experts)
    with pytest.raises(ValueError, match="not one of"):
        apply_ops(model, {"moe_experts": "Loop"})
