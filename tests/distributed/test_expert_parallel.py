"""Expert parallelism (gloo, CPU fp32): EP=2 on 2 ranks == one process with 2 micro-batches.

The model is a tiny Qwen3-MoE whose routing is far from balanced (random init), so ranks send
and receive different numbers of rows, and some experts get no token from some rank. 3 AdamW
steps with clipping; losses, gradient norms, the first step's full gradients and the final
weights must match. Both expert implementations (loop, grouped) run under EP.

Also: a 4-rank run (ep_fsdp=2 x ep=2: experts FSDP-sharded inside EP, the VeOmni mesh) gives the
same numbers, and a DCP checkpoint saved at EP=2 loads into one process without EP and continues
with the same loss and weights as the EP run.
"""
import pytest
import torch

from tests.distributed._common import (
    GLOBAL_ROWS, STEPS, TIMEOUT, full_params, global_data, make_optim, run_workers, train,
)
from tests.models.tiny import VOCAB

pytestmark = pytest.mark.dist
ATOL = 1e-5
# Weights after 3 Adam steps: Adam divides by sqrt(v), so an entry whose gradient is ~1e-7 moves by
# ~lr whatever its size, and a reduction-order rounding there shows up as up to ~2e-5 in the weight
# (seen once at 4 ranks). Losses and gradients, what EP computes, keep ATOL.
PARAM_ATOL = 5e-5


def tiny_moe(impl: str = "grouped", seed: int = 0, gradient_checkpointing=False):
    from transformers import Qwen3MoeConfig

    from veomni.models.registry import build_model
    from veomni.models.transformers.moe import Experts

    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
                         max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.init_weights()
    with torch.no_grad():  # a sharper router: unbalanced loads, empty experts on some ranks
        for m in model.modules():
            if type(m).__name__ == "TopKRouter":
                m.weight.mul_(20.0)
    for m in model.modules():
        if isinstance(m, Experts):
            m.impl = impl
    return model.train()


def _grads(model):
    from veomni.distributed import unwrap_model

    out = {}
    for name, p in unwrap_model(model).named_parameters():
        g = p.grad
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        out[name.replace("_checkpoint_wrapped_module.", "")] = g.detach().clone()
    return out


def _one_backward(model, ps, ids, labels, rows):
    """Gradients of the step-0 loss (global token normalisation, as train() computes it)."""
    import torch.nn.functional as F

    n = ps.all_reduce_sum(sum((labels[0, r] != -100).sum() for r in rows).double())
    for r in rows:
        def loss_fn(h, w, lab=labels[0, r]):
            return F.cross_entropy((h @ w.t()).float().flatten(0, 1), lab.flatten(), ignore_index=-100,
                                   reduction="sum") / n
        out = model(input_ids=ids[0, r], attn_mode="bidirectional", loss_fn=loss_fn)
        (out.loss * ps.dp_size).backward()
    grads = _grads(model)
    model.zero_grad(set_to_none=True)
    return grads


def _worker(out_path, ckpt_root, runs):
    import torch.distributed as dist

    from veomni.checkpoint import export_hf, save_checkpoint
    from veomni.distributed import init_parallel_state, parallelize

    dist.init_process_group("gloo", timeout=TIMEOUT)
    ids, labels = global_data()
    results = {}
    for impl, ac in runs:
        ps = init_parallel_state(dp_mode="fsdp2", ep_size=2)
        share = GLOBAL_ROWS // ps.dp_size
        rows = [slice(ps.dp_rank * share, (ps.dp_rank + 1) * share)]
        model = parallelize(tiny_moe(impl), ps, {"gradient_checkpointing": ac})
        experts = model.model.layers[0].mlp.experts
        local_shape = tuple(experts.gate_up_proj.to_local().shape)
        grads = _one_backward(model, ps, ids, labels, rows)
        opt, sched = make_optim(model)
        losses, norms = train(model, opt, sched, ps, ids, labels, rows, range(STEPS))
        res = {"losses": losses, "norms": norms, "params": full_params(model), "grads": grads,
               "local_shape": local_shape}
        if impl == "grouped" and ps.world_size == 2:
            save_checkpoint(ckpt_root, STEPS, model, opt, sched, parallel_state=ps)
            export_hf(model, f"{ckpt_root}/hf", None, ps)
            res["after_resume"] = train(model, opt, sched, ps, ids, labels, rows, range(1))[0]
            res["params_after_resume"] = full_params(model)
        results[impl] = res
        ps.destroy()
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def reference():
    from veomni.distributed import init_parallel_state

    ps = init_parallel_state(dp_mode="none")
    try:
        ids, labels = global_data()
        half = GLOBAL_ROWS // 2
        rows = [slice(0, half), slice(half, None)]
        model = tiny_moe("loop")
        grads = _one_backward(model, ps, ids, labels, rows)
        opt, sched = make_optim(model)
        losses, norms = train(model, opt, sched, ps, ids, labels, rows, range(STEPS))
        return {"losses": losses, "norms": norms, "params": full_params(model), "grads": grads}
    finally:
        ps.destroy()


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ep_ckpt")


@pytest.fixture(scope="module")
def results(tmp_path_factory, ckpt_root):
    out = tmp_path_factory.mktemp("ep") / "results.pt"
    run_workers(_worker, 2, str(out), str(ckpt_root), (("grouped", False), ("loop", True)), timeout=240)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def results_4ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep4") / "results.pt"
    run_workers(_worker, 4, str(out), "", (("grouped", False),), timeout=240)
    return torch.load(out, weights_only=False)["grouped"]


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_ep2_matches_one_process(results, reference, impl):
    got = results[impl]
    assert got["local_shape"] == (4, 48, 32)  # 8 experts over 2 EP ranks: 4 each
    assert got["losses"] == pytest.approx(reference["losses"], abs=ATOL)
    assert abs(reference["losses"][-1] - reference["losses"][0]) > 1e-3  # training moved
    assert got["norms"] == pytest.approx(reference["norms"], rel=1e-5)
    assert set(got["grads"]) == set(reference["grads"])
    for name, g in reference["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, atol=ATOL, rtol=0, msg=lambda m: f"grad {name}: {m}")
    for name, p in reference["params"].items():
        torch.testing.assert_close(got["params"][name], p, atol=PARAM_ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


def test_ep2_inside_ep_fsdp2_matches_one_process(results_4ranks, reference):
    """4 ranks: EP groups {0,1}, {2,3}; each expert block FSDP-sharded over {0,2} / {1,3}."""
    got = results_4ranks
    assert got["local_shape"] == (2, 48, 32)  # 4 local experts, FSDP-sharded in two
    assert got["losses"] == pytest.approx(reference["losses"], abs=ATOL)
    assert got["norms"] == pytest.approx(reference["norms"], rel=1e-5)
    for name, g in reference["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, atol=ATOL, rtol=0, msg=lambda m: f"grad {name}: {m}")
    for name, p in reference["params"].items():
        torch.testing.assert_close(got["params"][name], p, atol=PARAM_ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


def test_ep2_hf_export_gathers_every_expert(results, ckpt_root):
    from veomni.models.hf_io import load_model

    model = load_model(ckpt_root / "hf")
    got = dict(model.named_parameters())
    assert got["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 48, 32)
    for name, p in results["grouped"]["params"].items():
        torch.testing.assert_close(got[name], p, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")


def test_ep2_checkpoint_resumes_without_ep(results, ckpt_root):
    """Saved at EP=2 on 2 ranks (experts as EP DTensors) -> loaded by one process (plain experts):
    the weights are the EP run's, and the next step gives the same loss and weights."""
    from veomni.checkpoint import checkpoint_dir, load_checkpoint
    from veomni.distributed import init_parallel_state

    got = results["grouped"]
    ps = init_parallel_state(dp_mode="none")
    try:
        model = tiny_moe("grouped", seed=1)  # different init: everything must come from the checkpoint
        opt, sched = make_optim(model)
        load_checkpoint(checkpoint_dir(ckpt_root, STEPS), model, opt, sched, parallel_state=ps)
        for name, p in got["params"].items():
            torch.testing.assert_close(dict(model.named_parameters())[name], p, atol=0, rtol=0)
        ids, labels = global_data()
        half = GLOBAL_ROWS // 2
        losses, _ = train(model, opt, sched, ps, ids, labels, [slice(0, half), slice(half, None)], range(1))
        assert losses == pytest.approx(got["after_resume"], abs=ATOL)
        for name, p in got["params_after_resume"].items():
            torch.testing.assert_close(dict(model.named_parameters())[name], p, atol=ATOL, rtol=0,
                                       msg=lambda m: f"{name}: {m}")
    finally:
        ps.destroy()


@pytest.mark.parametrize("args,match", [
    (("ddp", 2, 2), "needs train.data_parallel=fsdp2"),
    (("none", 1, 2), "needs train.data_parallel=fsdp2"),
    (("fsdp2", 4, 2, 2), "HSDP\\) is not supported"),
    (("fsdp2", 6, 4), "does not divide the world size 6"),
    (("fsdp2", 2, 0), "must be an int >= 1"),
])
def test_unsupported_ep_layouts_are_refused(args, match):
    from veomni.distributed.parallel_state import ep_layout

    with pytest.raises(ValueError, match=match):
        ep_layout(*args)


def test_ep_layout_shapes():
    from veomni.distributed.parallel_state import ep_layout

    assert ep_layout("fsdp2", 8, 2) == {"ep_fsdp": 4, "ep": 2}
    assert ep_layout("ddp", 4, 1) == {"ep_fsdp": 4, "ep": 1}  # EP off: anything goes


def test_ep_on_a_dense_model_or_indivisible_experts_is_refused():
    from types import SimpleNamespace

    from tests.distributed._common import tiny_model
    from veomni.distributed.expert_parallel import apply_expert_parallel

    ps = SimpleNamespace(ep_size=2, ep_rank=0, submesh=lambda name: None, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="has no mixture-of-experts layers"):
        apply_expert_parallel(tiny_model(), ps)
    ps.ep_size = 3
    with pytest.raises(ValueError, match="num_experts=8 is not divisible by train.expert_parallel_size=3"):
        apply_expert_parallel(tiny_moe(), ps)
