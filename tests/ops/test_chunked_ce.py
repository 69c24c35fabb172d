"""Chunked linear + cross-entropy vs the eager full-logits reference."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from veomni.ops.chunked_ce import chunked_linear_cross_entropy, reference_linear_cross_entropy

N, H, V = 37, 8, 50


def _inputs(dtype=torch.float32, n=N, seed=0, weighted=True):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, H, generator=g) * 2).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (n,), generator=g)
    token_weights = torch.rand(n, generator=g) * 3 if weighted else None
    return hidden, weight, targets, token_weights


def _loss_and_grads(fn, hidden, weight, *args, scale=1.0, **kwargs):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, *args, **kwargs)
    (loss * scale).backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, 64])
@pytest.mark.parametrize("weighted", [True, False])
def test_matches_reference_fp32(chunk_size, weighted):
    hidden, weight, targets, tw = _inputs(weighted=weighted)
    # scale != 1 checks that backward multiplies the cached gradients by grad_output
    ref = _loss_and_grads(reference_linear_cross_entropy, hidden, weight, targets, tw, scale=2.5)
    got = _loss_and_grads(chunked_linear_cross_entropy, hidden, weight, targets, tw, scale=2.5, chunk_size=chunk_size)
    for r, c in zip(ref, got):
        torch.testing.assert_close(c, r, rtol=1e-5, atol=1e-5)


def test_loss_is_sum_of_weighted_ce():
    hidden, weight, targets, tw = _inputs()
    loss = chunked_linear_cross_entropy(hidden, weight, targets, tw, chunk_size=4)
    logits = hidden.detach().double() @ weight.detach().double().t()
    manual = sum(
        float(tw[i]) * float(torch.logsumexp(logits[i], 0) - logits[i, targets[i]]) for i in range(N)
    )
    assert abs(loss.item() - manual) < 1e-4 * max(1.0, abs(manual))


def test_bf16_inputs_fp32_math_and_bf16_grads():
    hidden, weight, targets, tw = _inputs(dtype=torch.bfloat16)
    loss, gh, gw = _loss_and_grads(chunked_linear_cross_entropy, hidden, weight, targets, tw, chunk_size=8)
    assert loss.dtype == torch.float32
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    # Reference on the same bf16 values upcast to fp32. The loss is fp32 math on exact inputs, so
    # it agrees tightly; the grads carry bf16 rounding (of d logits and of the result), so they are
    # compared by relative norm at bf16 precision (eps = 2**-8).
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    ref_loss, ref_gh, ref_gw = _loss_and_grads(reference_linear_cross_entropy, h32, w32, targets, tw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    for got, ref in ((gh, ref_gh), (gw, ref_gw)):
        assert (got.float() - ref).norm() / ref.norm() < 1e-2


def test_mixed_dtypes_raise():
    hidden, weight, targets, tw = _inputs()
    with pytest.raises(ValueError, match="same dtype"):
        chunked_linear_cross_entropy(hidden.to(torch.bfloat16), weight, targets, tw)


def test_empty_rows_give_zero_loss_and_connected_zero_grads():
    full_hidden = torch.randn(3, 4, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    idx = torch.zeros(0, dtype=torch.long)
    rows = full_hidden[idx, idx]  # [0, H], gathered like the objective does
    loss = chunked_linear_cross_entropy(rows, weight, torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert loss.item() == 0.0
    loss.backward()
    assert full_hidden.grad is not None and weight.grad is not None
    assert torch.count_nonzero(full_hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # views (t, slicing) allocate nothing
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_full_logits():
    n, chunk = 64, 8
    hidden, weight, targets, tw = _inputs(n=n)
    with _LargestTensor() as probe:
        chunked_linear_cross_entropy(hidden, weight, targets, tw, chunk_size=chunk).backward()
    assert probe.largest <= max(chunk * V, V * H, n * H) < n * V
    with _LargestTensor() as probe_ref:  # the probe itself must see the full logits of the reference
        reference_linear_cross_entropy(hidden, weight, targets, tw).backward()
    assert probe_ref.largest >= n * V


def test_bad_inputs_raise():
    hidden, weight, targets, tw = _inputs()
    bad = targets.clone()
    bad[0] = -100
    with pytest.raises(ValueError, match="ignore_index"):
        chunked_linear_cross_entropy(hidden, weight, bad, tw)
    with pytest.raises(ValueError, match="require grad"):
        chunked_linear_cross_entropy(hidden, weight, targets, tw.clone().requires_grad_())
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_linear_cross_entropy(hidden, weight, targets, tw, chunk_size=0)
    with pytest.raises(ValueError, match="hidden size mismatch"):
        chunked_linear_cross_entropy(hidden[:, :4], weight, targets, tw)


def test_second_backward_raises_instead_of_double_scaling():
    hidden, weight, targets, tw = _inputs()
    loss = chunked_linear_cross_entropy(hidden, weight, targets, tw, chunk_size=8) * 3.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        loss.backward()


def test_autocast_uses_autocast_dtype_for_matmuls_but_fp32_logits():
    hidden, weight, targets, tw = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, gh, gw = _loss_and_grads(chunked_linear_cross_entropy, hidden, weight, targets, tw, chunk_size=8)
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32  # grads in the params' dtype
    # Expected: the fp32 loss of the bf16-rounded inputs (what an autocast lm_head multiplies),
    # NOT bf16 logits. bf16 logits would miss this tolerance by orders of magnitude.
    hb = hidden.detach().bfloat16().float().requires_grad_()
    wb = weight.detach().bfloat16().float().requires_grad_()
    ref_loss, ref_gh, ref_gw = _loss_and_grads(reference_linear_cross_entropy, hb, wb, targets, tw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    for got, ref in ((gh, ref_gh), (gw, ref_gw)):
        assert (got - ref).norm() / ref.norm() < 1e-2
    with pytest.raises(ValueError, match="same dtype"):  # outside autocast mixed dtypes are ambiguous
        chunked_linear_cross_entropy(hidden.bfloat16(), weight, targets, tw)


def test_no_grad_skips_gradient_work():
    n, chunk = 64, 4
    hidden, weight, targets, tw = _inputs(n=n)
    expected = reference_linear_cross_entropy(hidden, weight, targets, tw).detach()
    with torch.no_grad(), _LargestTensor() as probe:
        loss = chunked_linear_cross_entropy(hidden, weight, targets, tw, chunk_size=chunk)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert probe.largest <= chunk * V < V * H  # neither grad_weight [V, H] nor grad_hidden allocated
