"""ParallelState layouts and errors, parallelize options, clip_grad_norm_ edge cases (one process)."""
import logging

import pytest
import torch
import torch.distributed as dist

from tests.distributed._common import full_params, global_data, make_optim, tiny_model, train
from veomni.distributed import (
    ParallelizeConfig, autocast_context, clip_grad_norm_, init_parallel_state, loss_scale_for_grad_averaging,
    mesh_layout, parallelize,
)
from veomni.distributed import parallel_state as pstate


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    yield
    if pstate._STATE is not None:  # a failed test must not leak its state into the next one
        pstate._STATE.destroy()


def test_mesh_layouts():
    assert mesh_layout("fsdp2", 4) == {"dp_replicate": 1, "dp_shard": 4, "sp": 1}
    assert mesh_layout("fsdp2", 4, dp_replicate=2) == {"dp_replicate": 2, "dp_shard": 2, "sp": 1}
    assert mesh_layout("ddp", 4) == {"dp_replicate": 4, "dp_shard": 1, "sp": 1}
    assert mesh_layout("none", 1) == {"dp_replicate": 1, "dp_shard": 1, "sp": 1}


@pytest.mark.parametrize("args,match", [
    (("fsdp2", 3, 2), "not divisible by dp_replicate=2"),
    (("none", 2, 1), "dp_mode='none' trains on one process"),
    (("ddp", 4, 2), "dp_mode='ddp' replicates"),
    (("zero3", 2, 1), "dp_mode='zero3' is not one of"),
    (("fsdp2", 2, 0), "dp_replicate must be an int >= 1"),
    (("none", 1, 2), "needs dp_mode='fsdp2'"),
])
def test_impossible_layouts_raise(args, match):
    with pytest.raises(ValueError, match=match):
        mesh_layout(*args)


def test_backend_and_env_errors(monkeypatch):
    with pytest.raises(ValueError, match="needs CUDA"):
        pstate._pick_backend("nccl", torch.device("cpu"))
    with pytest.raises(ValueError, match="'mpi' is not supported"):
        pstate._pick_backend("mpi", torch.device("cpu"))
    assert pstate._pick_backend(None, torch.device("cpu")) == "gloo"
    with pytest.raises(ValueError, match="backend='gloo' was given but dp_mode='none'"):
        init_parallel_state("none", backend="gloo")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="WORLD_SIZE is not"):
        init_parallel_state("none")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="0 <= RANK < WORLD_SIZE"):
        init_parallel_state("none")


def test_single_process_none():
    ps = init_parallel_state("none")
    assert (ps.rank, ps.world_size, ps.dp_rank, ps.dp_size, ps.is_main) == (0, 1, 0, 1, True)
    assert ps.mesh is None and not dist.is_initialized() and ps.device == torch.device("cpu")
    t = torch.tensor([3.0])
    assert ps.all_reduce_sum(t) is t and t.item() == 3.0 and ps.all_reduce_mean(t).item() == 3.0
    ps.barrier()
    assert pstate.get_parallel_state() is ps
    with pytest.raises(RuntimeError, match="already called"):
        init_parallel_state("none")
    assert loss_scale_for_grad_averaging(ps) == 1.0
    ps.destroy()
    with pytest.raises(RuntimeError, match="no ParallelState"):
        pstate.get_parallel_state()


def test_single_process_fsdp2_matches_plain(caplog):
    """World-1 FSDP2 (in-process HashStore group): same losses/params as the unwrapped model."""
    ids, labels = global_data()
    rows = [slice(0, 2), slice(2, 4)]
    ref_ps = init_parallel_state("none")
    ref = tiny_model()
    ref_losses, _ = train(ref, *make_optim(ref), ref_ps, ids, labels, rows, range(2))
    ref_ps.destroy()

    with caplog.at_level(logging.INFO, logger="veomni.distributed.parallel_state"):
        ps = init_parallel_state("fsdp2")
    try:
        assert "backend chosen for device type 'cpu'" in caplog.text and ps.backend == "gloo"
        assert ps.distributed and ps.dp_size == 1 and ps.submesh("dp").size() == 1
        model = parallelize(tiny_model(), ps, ParallelizeConfig(gradient_checkpointing=True))
        assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == "DTensor"
        losses, _ = train(model, *make_optim(model), ps, ids, labels, rows, range(2))
        got = full_params(model)
    finally:
        ps.destroy()
    assert not dist.is_initialized()
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), atol=1e-6, rtol=0)


def test_fsdp2_bf16_keeps_fp32_master_weights():
    ps = init_parallel_state("fsdp2")
    try:
        model = parallelize(tiny_model(tied=True), ps, {"mixed_precision": "bf16"})
        seen = {}

        def loss_fn(h, w):
            seen["h"], seen["w"] = h.dtype, w.dtype
            return (h @ w.t()).float().logsumexp(-1).mean()

        model(input_ids=torch.randint(0, 97, (2, 8)), attn_mode="bidirectional", loss_fn=loss_fn).loss.backward()
        assert seen == {"h": torch.bfloat16, "w": torch.bfloat16}  # compute in bf16
        for p in model.parameters():
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32  # fp32 master + grads
    finally:
        ps.destroy()


def test_parallelize_rejects_bad_config():
    ps = init_parallel_state("none")
    with pytest.raises(ValueError, match="unknown parallelize option"):
        parallelize(tiny_model(), ps, {"mixed_precison": "bf16"})
    with pytest.raises(ValueError, match="mixed_precision='fp16'"):
        ParallelizeConfig(mixed_precision="fp16")
    with pytest.raises(ValueError, match="built for dp_mode='none'"):
        parallelize(tiny_model(), ps, {"dp_mode": "fsdp2"})
    assert isinstance(autocast_context(ps, {"mixed_precision": "bf16"}), torch.autocast)
    assert not isinstance(autocast_context(ps, {}), torch.autocast)
    ps.destroy()


def test_activation_checkpointing_same_grads():
    ps = init_parallel_state("none")
    ids = torch.randint(0, 97, (2, 8))
    grads = []
    for ac in (False, True):
        model = tiny_model()
        if ac:
            model.gradient_checkpointing_enable()  # HF-style switch; parallelize must not wrap twice
        model = parallelize(model, ps, {"gradient_checkpointing": ac})
        out = model(input_ids=ids, attn_mode="bidirectional", loss_fn=lambda h, w: (h @ w.t()).logsumexp(-1).sum())
        out.loss.backward()
        grads.append({n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()})
    block = model.model.layers[0]
    assert type(block).__name__ == "CheckpointWrapper"
    assert type(block._checkpoint_wrapped_module).__name__ == "DecoderLayer"  # wrapped once
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g)
    ps.destroy()


def test_clip_grad_norm_edge_cases():
    model = tiny_model()
    assert clip_grad_norm_(model, 1.0) == 0.0  # no grads yet
    model(input_ids=torch.randint(0, 97, (1, 8)), attn_mode="causal",
          loss_fn=lambda h, w: (h @ w.t()).logsumexp(-1).sum()).loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    assert clip_grad_norm_(model, 0) == pytest.approx(norm, rel=1e-6)  # 0 = measure only
    assert clip_grad_norm_(model, norm / 4) == pytest.approx(norm, rel=1e-6)
    assert clip_grad_norm_(model, None) == pytest.approx(norm / 4, rel=1e-5)  # clipped in place
    with pytest.raises(ValueError, match="max_norm must be >= 0"):
        clip_grad_norm_(model, -1.0)
    model.lm_head.weight.grad[0, 0] = float("inf")
    before = model.model.norm.weight.grad.clone()
    assert clip_grad_norm_(model, 1.0) == float("inf")
    torch.testing.assert_close(model.model.norm.weight.grad, before)  # left alone: caller skips the step


def test_config_from_run_arguments():
    from veomni.arguments import Arguments

    args = Arguments()
    args.train.data_parallel, args.train.mixed_precision, args.model.gradient_checkpointing = "ddp", "bf16", True
    assert ParallelizeConfig.from_args(args) == ParallelizeConfig("ddp", "bf16", True)
