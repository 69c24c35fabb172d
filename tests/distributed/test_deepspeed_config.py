"""DeepSpeed settings: refused combinations and the generated DeepSpeed config (no deepspeed needed)."""
import json
from types import SimpleNamespace

import pytest
import torch

from veomni.arguments import Arguments, parse_args
from veomni.config.schema import ConfigError
from veomni.distributed.deepspeed_engine import DeepSpeedModel, DeepSpeedOptions, build_ds_config
from veomni.distributed.parallel_state import ep_layout, mesh_layout


def _parse(*flags):
    return parse_args(Arguments, ["--model.model_path=/m", *flags])


@pytest.mark.parametrize("flags, match", [
    (["--train.zero_stage=3"], r"train.zero_stage=3 is a DeepSpeed setting but train.data_parallel='fsdp2'"),
    (["--train.offload_optimizer=cpu", "--train.data_parallel=ddp"], r"train.offload_optimizer='cpu' is a DeepSpeed"),
    (["--train.deepspeed_config=x.json"], r"train.deepspeed_config='x.json' is a DeepSpeed"),
    (["--train.data_parallel=deepspeed"], r"needs train.zero_stage=2 .* or 3 .*got None"),
    (["--train.data_parallel=deepspeed", "--train.zero_stage=1"], r"got 1"),
    (["--train.data_parallel=deepspeed", "--train.zero_stage=4"], r"got 4"),
    (["--train.data_parallel=deepspeed", "--train.zero_stage=3", "--train.expert_parallel_size=2"],
     r"expert_parallel_size=2 does not compose with train.data_parallel=deepspeed"),
    (["--train.data_parallel=deepspeed", "--train.zero_stage=2", "--train.dp_replicate=2"],
     r"dp_replicate=2 is an FSDP2 \(HSDP\) setting"),
    (["--train.data_parallel=deepspeed", "--train.zero_stage=3", "--train.ulysses_parallel_size=2"],
     r"ulysses_parallel_size=2 does not compose with train.data_parallel=deepspeed"),
])
def test_refused_combinations(flags, match):
    with pytest.raises(ConfigError, match=match):
        _parse(*flags)


def test_accepted_settings():
    t = _parse("--train.data_parallel=deepspeed", "--train.zero_stage=3", "--train.offload_optimizer=cpu").train
    assert (t.data_parallel, t.zero_stage, t.offload_optimizer) == ("deepspeed", 3, "cpu")
    with pytest.raises(ConfigError, match="offload_optimizer"):
        _parse("--train.data_parallel=deepspeed", "--train.zero_stage=3", "--train.offload_optimizer=nvme")


def test_layouts():
    assert mesh_layout("deepspeed", 4) == {"dp_replicate": 4, "dp_shard": 1, "sp": 1}  # every rank a data replica
    with pytest.raises(ValueError, match="needs train.data_parallel=fsdp2"):
        mesh_layout("deepspeed", 4, 1, 2)
    with pytest.raises(ValueError, match="dp_replicate=2 is an FSDP2"):
        mesh_layout("deepspeed", 4, dp_replicate=2)
    with pytest.raises(ValueError, match="needs train.data_parallel=fsdp2"):
        ep_layout("deepspeed", 4, 2)
    with pytest.raises(ValueError, match="zero_stage=1"):
        DeepSpeedOptions(zero_stage=1)


def test_generated_config_and_user_json(tmp_path):
    opts = DeepSpeedOptions(zero_stage=3, offload_optimizer="cpu", micro_batch_size=2, grad_accum=3, max_grad_norm=0.5)
    cfg = build_ds_config(opts, "bf16", world_size=4)
    assert cfg["train_batch_size"] == 2 * 3 * 4 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"] == {"enabled": True} and not cfg["fp16"]["enabled"]
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["communication_data_type"] == "fp32"
    assert "offload_optimizer" not in build_ds_config(DeepSpeedOptions(zero_stage=2), "fp32", 1)["zero_optimization"]

    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0},
                                 "activation_checkpointing": {"cpu_checkpointing": False}}))
    cfg = build_ds_config(DeepSpeedOptions(zero_stage=3, config_file=str(extra)), "fp32", 2)
    assert cfg["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    assert cfg["activation_checkpointing"] == {"cpu_checkpointing": False}
    for clash, name in ((({"zero_optimization": {"stage": 2}}), "zero_optimization.stage"),
                        ({"optimizer": {"type": "Adam"}}, "optimizer.type"),
                        ({"gradient_clipping": 2.0}, "gradient_clipping"),
                        ({"zero_optimization": {"offload_optimizer": {"device": "nvme"}}},
                         "zero_optimization.offload_optimizer.device"),
                        ({"bf16": {"enabled": True}}, "bf16.enabled")):
        extra.write_text(json.dumps(clash))
        with pytest.raises(ValueError, match=f"sets \\['{name}'\\], which veomni derives"):
            build_ds_config(DeepSpeedOptions(zero_stage=3, config_file=str(extra)), "fp32", 2)
    extra.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read it as JSON"):
        build_ds_config(DeepSpeedOptions(zero_stage=3, config_file=str(extra)), "fp32", 2)


def test_checkpoint_kind_mismatch_is_a_setting_error(tmp_path):
    from veomni.checkpoint.dcp import _check_engine

    ps = SimpleNamespace(dp_size=2, world_size=2)
    ds_model = DeepSpeedModel(torch.nn.Linear(2, 2), ps, DeepSpeedOptions(zero_stage=3), "fp32")
    plain = torch.nn.Linear(2, 2)
    ds_manifest = {"engine": "deepspeed", "zero_stage": 3, "world_size": 2, "dp_mode": "deepspeed"}
    _check_engine(tmp_path, ds_manifest, ds_model, ps)  # same stage, same world size: fine
    with pytest.raises(ValueError, match="saved by DeepSpeed ZeRO-3 on 2 process.*train.data_parallel=deepspeed"):
        _check_engine(tmp_path, ds_manifest, plain, ps)
    with pytest.raises(ValueError, match="is a DCP checkpoint \\(data_parallel=fsdp2\\); DeepSpeed cannot load it"):
        _check_engine(tmp_path, {"world_size": 2, "dp_mode": "fsdp2"}, ds_model, ps)
    with pytest.raises(ValueError, match="ZeRO-3 shards of 2 process.*this run is ZeRO-3 on 1"):
        _check_engine(tmp_path, ds_manifest, ds_model, SimpleNamespace(world_size=1))
    with pytest.raises(ValueError, match="ZeRO-2 shards .* this run is ZeRO-3"):
        _check_engine(tmp_path, {**ds_manifest, "zero_stage": 2}, ds_model, ps)
