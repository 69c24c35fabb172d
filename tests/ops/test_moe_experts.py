"""MoE expert compute: the grouped path equals the reference loop, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

from veomni.ops.moe_experts import EXPERT_FORWARD, expert_ffn, experts_grouped, experts_loop

# Odd token and expert counts, sizes that are not powers of two: catches a reshape or a
# grouped-matmul offset that assumes them (unaligned H and I have their own test below).
T, H, I, E = 37, 20, 12, 7
EMPTY = 3  # the expert that receives no token


def _inputs(k: int, seed: int = 0, empty=(EMPTY,), h: int = H, i: int = I):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, h, generator=g).requires_grad_()
    gate_up = (torch.randn(E, 2 * i, h, generator=g) * 0.2).requires_grad_()
    down = (torch.randn(E, h, i, generator=g) * 0.2).requires_grad_()
    # k distinct experts per token, never one of `empty`.
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    scores = torch.rand(T, len(allowed), generator=g)
    top_idx = allowed[scores.topk(k, dim=-1).indices]
    top_w = torch.rand(T, k, generator=g).softmax(-1).requires_grad_()
    return x, top_idx, top_w, gate_up, down


def _run(fn, x, top_idx, top_w, gate_up, down):
    leaves = (x, top_w, gate_up, down)
    for t in leaves:
        t.grad = None
    out = fn(x, top_idx, top_w, gate_up, down, F.silu)
    # A non-uniform upstream gradient, so a permuted row cannot cancel out.
    g = torch.Generator().manual_seed(1)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    return out.detach(), [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_grouped_equals_loop_forward_and_backward(k):
    inputs = _inputs(k)
    assert not (inputs[1] == EMPTY).any()
    ref, ref_grads = _run(experts_loop, *inputs)
    out, grads = _run(experts_grouped, *inputs)
    assert out.abs().max() > 0.1  # the experts really computed something
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("x", "top_w", "gate_up", "down"), grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"grad of {n}: {m}")
    # The expert without tokens gets an exactly zero gradient from both paths.
    gate_up_grad, down_grad = grads[2], grads[3]
    assert gate_up_grad[EMPTY].abs().max() == 0 and down_grad[EMPTY].abs().max() == 0
    assert gate_up_grad[EMPTY - 1].abs().max() > 0


def test_grouped_with_unaligned_intermediate_size():
    # torch._grouped_mm alone refuses these (row strides not a multiple of 16 bytes); grouped_mm
    # pads K and M with zeros, so the result and all gradients stay exact.
    inputs = _inputs(2, i=19, h=21)
    ref, ref_grads = _run(experts_loop, *inputs)
    out, grads = _run(experts_grouped, *inputs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_grouped_equals_loop_with_several_empty_experts_and_one_token():
    inputs = _inputs(2, seed=3, empty=(0, 4, 6))  # the first and the last expert empty
    x, top_idx, top_w, gate_up, down = inputs
    ref, ref_grads = _run(experts_loop, *inputs)
    out, grads = _run(experts_grouped, *inputs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    one = [t[:1].detach().clone().requires_grad_(t.requires_grad) if t.dim() and t.shape[0] == T else t
           for t in (x, top_idx, top_w)]
    a, ga = _run(experts_loop, *one, gate_up, down)
    b, gb = _run(experts_grouped, *one, gate_up, down)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)


def test_expert_ffn_on_zero_rows_still_gives_weight_gradients():
    """An expert-parallel rank may receive no token: the weights must still get a (zero) grad."""
    _, _, _, gate_up, down = _inputs(2)
    x = torch.zeros(0, H, requires_grad=True)
    for impl in EXPERT_FORWARD:
        gate_up.grad = down.grad = None
        out = expert_ffn(x, torch.zeros(E, dtype=torch.long), gate_up, down, F.silu, impl)
        assert out.shape == (0, H)
        out.sum().backward()
        assert gate_up.grad is not None and gate_up.grad.abs().max() == 0 and down.grad is not None


def test_moe_block_switch_changes_only_the_kernel():
    """A whole SparseMoeBlock (router + experts) under impl=loop vs grouped: same output and the
    same gradient for every parameter, the router weight included."""
    from transformers import Qwen3MoeConfig

    from veomni.models.transformers.dense_decoder import activation
    from veomni.models.transformers.moe import SparseMoeBlock
    from veomni.ops.registry import apply_ops

    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=3,
                         norm_topk_prob=True)
    torch.manual_seed(0)
    block = SparseMoeBlock(cfg, activation(cfg))
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(3, 11, H)
    valid = torch.ones(3, 11, dtype=torch.bool)
    valid[2, 7:] = False
    results = {}
    for impl in ("loop", "grouped"):
        assert apply_ops(block, {"moe_experts": impl})["moe_experts"] == impl
        assert block.experts.impl == impl
        block.zero_grad(set_to_none=True)
        out, stats = block(x, valid)
        (out.pow(2).sum() + stats.prob_sum.pow(2).sum()).backward()
        results[impl] = (out.detach(), {n: p.grad.clone() for n, p in block.named_parameters()})
    torch.testing.assert_close(results["grouped"][0], results["loop"][0], atol=1e-5, rtol=1e-5)
    assert set(results["loop"][1]) == {"gate.weight", "experts.gate_up_proj", "experts.down_proj"}
    for name, g in results["loop"][1].items():
        torch.testing.assert_close(results["grouped"][1][name], g, atol=1e-5, rtol=1e-5, msg=name)
