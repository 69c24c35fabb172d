"""Qwen3.5 hybrid (GDN + gated attention) under FSDP2 with activation checkpointing: 2 ranks
(gloo, CPU fp32) == 1 process with 2 accumulation steps, in bidirectional mode with the reverse
scans live (reverse gates non-zero), over 3 AdamW steps with clipping."""
import pytest
import torch

from tests.distributed._common import (GLOBAL_ROWS, STEPS, TIMEOUT, full_params, global_data, make_optim,
                                       run_workers, train)
from tests.models.tiny import VOCAB

pytestmark = pytest.mark.dist
ATOL = 1e-5


def hybrid_model(seed: int = 0):
    from transformers import Qwen3_5TextConfig

    from veomni.models.registry import build_model

    cfg = Qwen3_5TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                            layer_types=["linear_attention", "full_attention", "linear_attention"],
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, linear_num_key_heads=2,
                            linear_num_value_heads=4, linear_key_head_dim=6, linear_value_head_dim=5,
                            tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("reverse_gate"):
                p.fill_(0.5)  # the reverse scans contribute, so their gradients are compared too
    return model.train()


def _worker(out_path):
    import torch.distributed as dist

    from veomni.distributed import init_parallel_state, parallelize

    dist.init_process_group("gloo", timeout=TIMEOUT)
    ids, labels = global_data()
    ps = init_parallel_state(dp_mode="fsdp2")
    half = GLOBAL_ROWS // ps.dp_size
    model = parallelize(hybrid_model(), ps, {"gradient_checkpointing": True})
    opt, sched = make_optim(model)
    losses, norms = train(model, opt, sched, ps, ids, labels, [slice(ps.dp_rank * half, (ps.dp_rank + 1) * half)],
                          range(STEPS))
    params = full_params(model)
    ps.destroy()
    if dist.get_rank() == 0:
        torch.save({"losses": losses, "norms": norms, "params": params}, out_path)
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp2_with_checkpointing_matches_one_process(tmp_path):
    from veomni.distributed import init_parallel_state

    out = tmp_path / "results.pt"
    run_workers(_worker, 2, str(out))
    got = torch.load(out, weights_only=False)
    ps = init_parallel_state(dp_mode="none")
    try:
        ids, labels = global_data()
        model = hybrid_model()
        init = {k: v.detach().clone() for k, v in model.named_parameters()}
        opt, sched = make_optim(model)
        half = GLOBAL_ROWS // 2
        losses, norms = train(model, opt, sched, ps, ids, labels, [slice(0, half), slice(half, None)], range(STEPS))
        ref = full_params(model)
    finally:
        ps.destroy()
    assert got["losses"] == pytest.approx(losses, abs=ATOL)
    assert abs(losses[-1] - losses[0]) > 1e-3
    assert got["norms"] == pytest.approx(norms, rel=1e-5)
    assert set(got["params"]) == set(ref)
    for name, p in ref.items():
        torch.testing.assert_close(got["params"][name], p, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
    gate = "model.layers.0.linear_attn.reverse_gate"
    assert (ref[gate] - init[gate]).abs().max() > 1e-4  # the reverse branch trained
